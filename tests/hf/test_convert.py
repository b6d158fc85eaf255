"""tools/convert_to_hf.py and convert_from_hf.py end to end on a TP1 checkpoint: verify,
AutoModelForCausalLM + generate (cached == uncached), bit-exact round trip, every error."""

import json
import os
import shutil
import sys

import pytest
import torch

from tests.conftest import ROOT
from tests.hf import helpers as H

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, str(ROOT / "tools"))
import convert_from_hf  # noqa: E402
import convert_to_hf  # noqa: E402

pytestmark = [pytest.mark.checkpoint, pytest.mark.both_releases]  # CI runs it on megatron-core 0.16.1 too

ARGS = dict(num_query_groups=2, gated_linear_unit=True, chunk_offsets=[1, 1, 0], topology="mesh")


@pytest.fixture(scope="module")
def ckpt(megatron, tmp_path_factory):
    args = H.model_args(**ARGS)
    model = H.build(args, seed=3)
    save = tmp_path_factory.mktemp("ckpt")
    H.save_checkpoint(model, args, save)
    return save


@pytest.fixture(scope="module")
def hf_dir(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "model"
    assert convert_to_hf.main(["--load", str(ckpt), "--out", str(out), "--verify"]) == 0
    return out


def _load(path):
    from spiral_megatron.conversion.convert import load_hf

    return load_hf(path)


def test_folder_contents(hf_dir):
    names = {p.name for p in hf_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "modeling_spiral.py",
            "configuration_spiral.py", "functional_spiral.py", "layers_spiral.py", "loop_spiral.py", "cache_spiral.py",
            "padding_spiral.py", "tokenizer.json",
            "tokenizer_config.json", "megatron_vocab_padding.safetensors"} <= names
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_spiral.SpiralForCausalLM"
    assert config["vocab_size"] == H.VOCAB and config["megatron_vocab_size"] == H.PADDED_VOCAB
    assert not any(p.name.startswith(".") for p in hf_dir.parent.iterdir())  # temp folder renamed away


def test_the_folder_has_a_model_card_the_hub_reads(hf_dir):
    """README.md: the Hub's metadata (read by huggingface_hub's own parser), the architecture, and
    the parameter count of the model transformers loads from the folder."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(hf_dir / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert "custom_code" in card.data.tags
    hf = _load(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    assert f"| parameters | {sum(p.numel() for p in hf.parameters()):,} |" in card.text
    assert f"(chunk sizes {','.join(map(str, config['chunk_sizes']))})" in card.text
    assert "trust_remote_code=True" in card.text and "megatron_vocab_padding.safetensors" in card.text


def test_generate_cached_equals_uncached(hf_dir):
    from transformers import AutoTokenizer

    model = _load(hf_dir)
    tok = AutoTokenizer.from_pretrained(str(hf_dir), trust_remote_code=True)
    ids = torch.tensor([tok("w1 w2 w3 w4 w5")["input_ids"], [7, 8, 9, 10, 11]])  # equal lengths batch
    kw = dict(max_new_tokens=12, pad_token_id=0, eos_token_id=None)
    greedy_c = model.generate(ids, do_sample=False, use_cache=True, output_logits=True, return_dict_in_generate=True, **kw)
    greedy_u = model.generate(ids, do_sample=False, use_cache=False, **kw)
    assert torch.equal(greedy_c.sequences, greedy_u)
    with torch.no_grad():  # every cached step's logits == the full forward's at that position
        full = model(greedy_c.sequences, use_cache=False).logits
    steps = torch.stack(greedy_c.logits, dim=1)  # [b, new, V]
    torch.testing.assert_close(steps, full[:, ids.shape[1] - 1 : -1], rtol=0, atol=1e-5)
    torch.manual_seed(0)
    sample_c = model.generate(ids, do_sample=True, top_k=20, use_cache=True, **kw)
    torch.manual_seed(0)
    sample_u = model.generate(ids, do_sample=True, top_k=20, use_cache=False, **kw)
    assert torch.equal(sample_c, sample_u)


def test_padding_inside_a_row_is_refused(hf_dir):
    model = _load(hf_dir)
    ids = torch.tensor([[4, 0, 6], [4, 5, 6]])
    mask = torch.tensor([[1, 0, 1], [1, 1, 1]])
    with pytest.raises(ValueError, match="must be left padding"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0)


def test_round_trip_is_bit_exact(ckpt, hf_dir, tmp_path, monkeypatch):
    """HF -> job layout gives the converted checkpoint's tensors back, bit for bit; its save, in
    one process, starts no helper process (job/checkpoint/results_queue.py)."""
    import multiprocessing

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from spiral_megatron.model.model_args import ModelArgs

    monkeypatch.setattr(filesystem_async, "_results_queue", None)  # as in a new process
    before = set(multiprocessing.active_children())
    back = tmp_path / "back"
    assert convert_from_hf.main(["--load", str(hf_dir), "--save", str(back), "--iteration", "200"]) == 0
    assert set(multiprocessing.active_children()) == before  # Megatron's writer would spawn its manager
    a = dist_checkpointing.load_plain_tensors(str(ckpt / "iter_0000200"))
    b = dist_checkpointing.load_plain_tensors(str(back / "iter_0000200"))
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    old, new = ModelArgs.load(ckpt / "iter_0000200/model_args.json"), ModelArgs.load(back / "iter_0000200/model_args.json")
    arch = lambda a: ModelArgs.from_config(a.spiral_config(), vocab_size=a.vocab_size)  # noqa: E731
    assert arch(old) == arch(new)
    assert (back / "iter_0000200/tokenizer/tokenizer.json").is_file()
    assert (back / "latest_checkpointed_iteration.txt").read_text() == "200"


def test_bf16_and_sharded(ckpt, tmp_path):
    from spiral_megatron.conversion import convert, hf_io

    out = tmp_path / "bf16"
    assert convert_to_hf.main(["--load", str(ckpt), "--out", str(out), "--dtype", "bf16", "--verify",
                               "--max-shard-size", str(20e3 / 1024**3)]) == 0
    assert (out / hf_io.INDEX).is_file() and len(list(out.glob("model-*-of-*.safetensors"))) > 1
    config, state, _ = hf_io.read_hf_folder(out)
    assert all(v.dtype == torch.bfloat16 for v in state.values())
    assert convert.load_hf(out)(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, H.VOCAB)
    # back to the job's layout and out again, each in the dtype it came in: the same bf16 folder
    assert convert_from_hf.main(["--load", str(out), "--save", str(tmp_path / "back")]) == 0
    from megatron.core import dist_checkpointing

    stored = dist_checkpointing.load_plain_tensors(str(tmp_path / "back" / "iter_0000000"))
    assert {v.dtype for v in stored.values() if isinstance(v, torch.Tensor)} == {torch.bfloat16}
    assert convert_to_hf.main(["--load", str(tmp_path / "back"), "--out", str(tmp_path / "again")]) == 0
    _, again, _ = hf_io.read_hf_folder(tmp_path / "again")
    assert set(again) == set(state) and all(torch.equal(again[k], state[k]) for k in state)


def test_errors(ckpt, hf_dir, tmp_path, capsys):
    def run(*argv):
        rc = convert_to_hf.main(list(argv))
        return rc, capsys.readouterr().err

    rc, err = run("--load", str(tmp_path / "nope"), "--out", str(tmp_path / "o1"))
    assert rc == 2 and "does not exist" in err
    rc, err = run("--load", str(ckpt), "--out", str(tmp_path / "o2"), "--iteration", "5")
    assert rc == 2 and "no checkpoint at iteration 5" in err
    rc, err = run("--load", str(ckpt), "--out", str(hf_dir))
    assert rc == 2 and "--force" in err

    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    for f in (broken / "iter_0000200").glob("*.distcp"):
        f.write_bytes(f.read_bytes()[:100])
    rc, err = run("--load", str(broken), "--out", str(tmp_path / "o3"))
    assert rc == 2 and "corrupt or truncated" in err and not (tmp_path / "o3").exists()

    odd = tmp_path / "odd"
    shutil.copytree(ckpt, odd)
    margs = json.loads((odd / "iter_0000200/model_args.json").read_text())
    margs["config"]["rotary_interleaved"] = True
    (odd / "iter_0000200/model_args.json").write_text(json.dumps(margs))
    rc, err = run("--load", str(odd), "--out", str(tmp_path / "o4"))
    assert rc == 2 and "cannot express" in err and "rotary_interleaved" in err

    bin_only = tmp_path / "bin_only"
    shutil.copytree(hf_dir, bin_only)
    (bin_only / "model.safetensors").rename(bin_only / "pytorch_model.bin")
    assert convert_from_hf.main(["--load", str(bin_only), "--save", str(tmp_path / "b1")]) == 2
    assert "only safetensors" in capsys.readouterr().err

    classifier = tmp_path / "classifier"  # a fine-tuned AutoModelForSequenceClassification's folder
    shutil.copytree(hf_dir, classifier)
    config = json.loads((classifier / "config.json").read_text())
    (classifier / "config.json").write_text(json.dumps({**config, "architectures": ["SpiralForSequenceClassification"]}))
    assert convert_from_hf.main(["--load", str(classifier), "--save", str(tmp_path / "b3")]) == 2
    assert "holds a SpiralForSequenceClassification" in capsys.readouterr().err and not (tmp_path / "b3").exists()

    cut = tmp_path / "cut"
    shutil.copytree(hf_dir, cut)
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert convert_from_hf.main(["--load", str(cut), "--save", str(tmp_path / "b2")]) == 2
    assert "corrupt or truncated" in capsys.readouterr().err


def test_pickle_weights_are_refused(hf_dir, tmp_path):
    """A folder whose weights are a pickled .bin is refused by the model class itself."""
    from transformers import AutoModelForCausalLM

    pickled = tmp_path / "pickled"
    shutil.copytree(hf_dir, pickled)
    state = {}
    for f in pickled.glob("*.safetensors"):
        from safetensors.torch import load_file

        state.update(load_file(str(f)))
        f.unlink()
    for f in pickled.glob("*.safetensors.index.json"):
        f.unlink()
    torch.save(state, pickled / "pytorch_model.bin")
    with pytest.raises(OSError, match=r"holds no .safetensors weights \(only the pickle files pytorch_model.bin\)"):
        AutoModelForCausalLM.from_pretrained(str(pickled), trust_remote_code=True)
    with pytest.raises(ValueError, match="safetensors only"):
        AutoModelForCausalLM.from_pretrained(str(hf_dir), trust_remote_code=True, use_safetensors=False)


def test_converted_folder_follows_the_umask(hf_dir):
    mask = os.umask(0)
    os.umask(mask)
    assert hf_dir.stat().st_mode & 0o777 == 0o777 & ~mask
    assert (hf_dir / "config.json").stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_full_disk_is_one_line_and_leaves_the_output_as_it_was(ckpt, hf_dir, tmp_path, capsys, monkeypatch):
    """Both converters on a disk that fills while they write: one line naming the output, the
    cause and the space left, exit 1 (a failed write, as the training job's failed save), and
    nothing half-written behind (no staging folder, no temporary, the old folder intact).
    The fault is raised where a full disk raises it: in Megatron's checkpoint writer (which reports
    it as a failed worker) and in safetensors' file write. Before: a traceback each."""
    import errno

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from spiral_megatron.conversion import hf_io

    def full(*_, **__):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(filesystem_async, "_write_item", full)
        back = tmp_path / "back"
        assert convert_from_hf.main(["--load", str(hf_dir), "--save", str(back)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: writing {back / 'iter_0000000'} failed (rank 0: ") and err.count("\n") == 1, err
    assert "MiB free on its file system" in err and f"{back} holds what it held before" in err, err
    assert sorted(p.name for p in back.iterdir()) == [], "the failed write's staging folder is deleted"

    before = sorted(p.name for p in hf_dir.iterdir())
    with monkeypatch.context() as m:
        m.setattr(hf_io, "save_file", full)  # safetensors' writer of the weights
        assert convert_to_hf.main(["--load", str(ckpt), "--out", str(hf_dir), "--force"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: writing {hf_dir} failed (OSError: [Errno 28] No space left on device)"), err
    assert sorted(p.name for p in hf_dir.iterdir()) == before, "the old folder stays"
    assert not [p for p in hf_dir.parent.iterdir() if p.name.startswith(f".{hf_dir.name}.")], "no temporary left"
