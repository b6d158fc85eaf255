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
