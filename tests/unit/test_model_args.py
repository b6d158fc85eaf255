"""model_args.json: a file written before an architecture field existed rebuilds the same model."""

import json

from spiral_megatron.config import flavors
from spiral_megatron.model.model_args import ModelArgs


def test_a_file_without_scale_embeddings_keeps_unscaled_embeddings(tmp_path):
    args = ModelArgs.from_config(flavors.get("debug").config(), vocab_size=512)
    assert args.config["scale_embeddings"] is True  # today's default is saved explicitly
    old = json.loads(args.to_json())
    del old["config"]["scale_embeddings"]  # as files written before the field existed
    (tmp_path / "model_args.json").write_text(json.dumps(old))
    assert ModelArgs.load(tmp_path / "model_args.json").spiral_config().scale_embeddings is False
    args.save(tmp_path / "new.json")
    assert ModelArgs.load(tmp_path / "new.json").spiral_config().scale_embeddings is True


def test_args_without_the_field_save_what_they_build(tmp_path):
    args = ModelArgs(config={"hidden_size": 64, "num_attention_heads": 4, "num_core_layers": 1,
                             "chunk_sizes": [2, 1], "ffn_hidden_size": 256}, vocab_size=128)
    built = args.spiral_config().scale_embeddings
    args.save(tmp_path / "a.json")
    assert ModelArgs.load(tmp_path / "a.json").spiral_config().scale_embeddings == built


def test_rotary_keys_reach_the_built_model_and_its_record(megatron):
    """--rotary-base and --rotary-percent (Megatron-LM's flags) build RoPE with that base over
    that share of each head, recorded in model_args.json; reference: RoPE's frequencies by hand."""
    import torch

    from spiral_megatron.job.settings.resolve import resolve
    from spiral_megatron.model.model_args import make_model
    from tests.conftest import ROOT

    job = resolve(["--rotary-base", "500000", "--rotary-percent", "0.5"], ROOT / "examples" / "configs" / "debug-cpu.yaml")
    assert (job.model_args.rotary_base, job.model_args.rotary_percent) == (500000, 0.5)
    model = make_model(job.model, job.model_args, job.backend)
    rotated = int(job.model.kv_channels * 0.5)  # 8 of a head's 16 dimensions
    expected = 1.0 / 500000 ** (torch.arange(0, rotated, 2, dtype=torch.float32) / rotated)
    torch.testing.assert_close(model.rotary_pos_emb.inv_freq.cpu(), expected)
