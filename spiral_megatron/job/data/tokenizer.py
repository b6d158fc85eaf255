"""A Hugging Face `tokenizers` tokenizer with what Megatron's datasets ask of one.

Megatron's `GPTDatasetConfig.tokenizer` needs `eod` and `vocab_size` (and optionally `pad`);
this wraps a local `tokenizer.json` (or a folder holding one), or trains a byte-level BPE
offline. Nothing is downloaded.
"""

import hashlib
import json
from pathlib import Path
from typing import Iterable, List, Union

EOD_TOKEN = "<|endoftext|>"
EOD_CANDIDATES = (EOD_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>")
# Parts of a tokenizer.json that do not decide what an id means: a session's truncation and padding
# (transformers saves the ones last used), and the post-processor, which only adds special tokens
# (the job encodes without them). The digest leaves them out.
NOT_THE_VOCABULARY = ("truncation", "padding", "post_processor")


class Tokenizer:
    """Text <-> token ids, with the end-of-document id Megatron's GPTDataset appends."""

    def __init__(self, hf_tokenizer, path: Union[str, Path, None] = None):
        self.hf = hf_tokenizer
        self.hf.no_truncation()  # documents are encoded whole: a saved session's truncation never applies
        self.hf.no_padding()
        self.path = None if path is None else str(path)  # where it was loaded from, for messages
        self.eod = self._find_eod()

    def _find_eod(self) -> int:
        for token in EOD_CANDIDATES:
            idx = self.hf.token_to_id(token)
            if idx is not None:
                return idx
        raise ValueError(f"tokenizer has none of the end-of-document tokens {EOD_CANDIDATES}")

    @property
    def unique_identifiers(self) -> dict:
        """What Megatron's datasets hash into their cache names (the vocabulary's digest)."""
        return {"class": type(self).__name__, "vocab_size": self.vocab_size, "sha256": self.digests[0]}

    @property
    def digests(self) -> tuple:
        """(the digest of what maps ids to text: the tokenizer.json without NOT_THE_VOCABULARY, as
        canonical JSON; the digest of the whole serialization, which data and checkpoints made
        before recorded). The same tokenizer saved again by transformers keeps the first."""
        whole = self.hf.to_str()
        content = {k: v for k, v in json.loads(whole).items() if k not in NOT_THE_VOCABULARY}
        canonical = json.dumps(content, sort_keys=True, ensure_ascii=False)
        return tuple(hashlib.sha256(text.encode()).hexdigest()[:16] for text in (canonical, whole))

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> List[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def save(self, folder: Union[str, Path]) -> None:
        """tokenizer.json plus a tokenizer_config.json that `transformers` can load."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(folder / "tokenizer.json"))
        eod = self.hf.id_to_token(self.eod)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eod,
                  "bos_token": eod, "unk_token": eod, "add_prefix_space": False}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Tokenizer":
        """From `tokenizer.json` or a folder holding one; FileNotFoundError names the path."""
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer {str(path)!r}: no tokenizer.json there")
        return cls(HFTokenizer.from_file(str(file)), path)

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        """A byte-level BPE trained on `texts` (lossless: decode(encode(t)) == t)."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[EOD_TOKEN], show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)
