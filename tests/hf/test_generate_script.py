"""examples/generate.py: several prompts as one left-padded batch, beam search and sampling
through its options, against transformers' generate on each prompt alone without a cache."""

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def script():
    spec = importlib.util.spec_from_file_location("generate_example", ROOT / "examples" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("options", [[], ["--num-beams", "3", "--num-return-sequences", "2"],
                                     ["--do-sample", "--temperature", "0.7", "--top-p", "0.9"]])
def test_a_batch_of_prompts_generates_what_each_prompt_alone_does_without_a_cache(folder, options):
    gen = script()
    args = gen.parse_args(["--model", str(folder), "--prompt", "ab", "a longer prompt", "--max-new-tokens", "6",
                           *options])
    tokenizer, model = gen.load(args.model)
    torch.manual_seed(0)
    batch = gen.generate(tokenizer, model, args.prompt, **gen.generation_kwargs(args))
    alone = []
    for prompt in args.prompt:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        kwargs = dict(gen.generation_kwargs(args), use_cache=False)
        if args.do_sample:  # the batch's draws: one prompt's rows come from the batch's random stream
            continue
        out = model.generate(ids, pad_token_id=tokenizer.pad_token_id, **kwargs)
        alone += tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    assert len(batch) == len(args.prompt) * args.num_return_sequences
    if not args.do_sample:
        assert batch == alone
    else:  # sampling: the same seed gives the same batch, another seed another
        torch.manual_seed(0)
        assert gen.generate(tokenizer, model, args.prompt, **gen.generation_kwargs(args)) == batch
        torch.manual_seed(1)
        assert gen.generate(tokenizer, model, args.prompt, **gen.generation_kwargs(args)) != batch


def test_a_combination_transformers_refuses_is_one_line(folder, capsys):
    assert script().main(["--model", str(folder), "--num-return-sequences", "3", "--max-new-tokens", "2"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading bar
    assert last.startswith("generate.py: error: ") and "num_return_sequences" in last


def test_stop_strings_end_each_sequence_after_the_string(folder, tmp_path):
    """--stop-strings: each prompt's text ends right after the first new token that is the
    string, and is what it was without the option up to there; a prompt that never generates
    it runs to --max-new-tokens. The folder's word-level vocabulary gets the word
    StopStringCriteria tokenizes as its prefix ("abcdef"), as test_generate.py's does."""
    import json
    import shutil

    shutil.copytree(folder, tmp_path / "model")
    tokenizer_json = json.loads((folder / "tokenizer.json").read_text())
    vocab = tokenizer_json["model"]["vocab"]
    vocab["abcdef"] = vocab.pop("w0")
    (tmp_path / "model" / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    gen = script()
    prompts = ["w5 w9 w3", "w7"]
    base = ["--model", str(tmp_path / "model"), "--prompt", *prompts, "--max-new-tokens", "10"]
    tokenizer, model = gen.load(str(tmp_path / "model"))
    full = gen.generate(tokenizer, model, prompts, **gen.generation_kwargs(gen.parse_args(base)))
    stop = full[0].split()[2]  # the first prompt's third new word
    args = gen.parse_args(base + ["--stop-strings", stop])
    stopped = gen.generate(tokenizer, model, prompts, **gen.generation_kwargs(args))
    for text, reference in zip(stopped, full):
        words = reference.split()
        cut = words.index(stop) + 1 if stop in words else len(words)
        assert text.split() == words[:cut]
    assert len(stopped[0].split()) <= 3 < len(full[0].split())


def test_dtype_loads_the_model_in_it_and_auto_keeps_the_folders(folder, capsys):
    """--dtype bf16 runs an fp32 folder in bfloat16 (the line after the texts says so); the default
    keeps the dtype the folder's weights are stored in."""
    gen = script()
    assert gen.load(str(folder))[1].dtype == torch.float32
    assert gen.load(str(folder), "bf16")[1].dtype == torch.bfloat16
    assert gen.main(["--model", str(folder), "--prompt", "ab", "--max-new-tokens", "3", "--dtype", "bf16"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("cache, bfloat16]")
