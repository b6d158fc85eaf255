"""Pretrain a SpiralFormer through Megatron-Bridge's `pretrain()` (docs/BRIDGE.md).

    torchrun --nproc_per_node=2 examples/bridge/pretrain_spiral.py [--flavor debug]
        [--config-file overrides.yaml] [KEY=VALUE ...]

The recipe (`spiral_megatron.bridge.recipes.pretrain_config`) holds the project's defaults for
the flavor; Bridge's usual overrides follow, as in Bridge's own examples: a YAML file of
ConfigContainer fields, then Hydra-style `train.train_iters=20 model.tensor_model_parallel_size=2
checkpoint.save=DIR optimizer.lr=1e-3 model.hidden_size=128` on the command line. Run again with
the same checkpoint.save to resume: checkpoint.load follows checkpoint.save unless given.
"""

import argparse
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavor", default="debug", help="a flavor of spiral_megatron.config.flavors (default debug)")
    p.add_argument("--config-file", default=None, help="YAML of ConfigContainer fields, applied over the recipe")
    return p.parse_known_args(argv)


def make_config(flavor: str, config_file, overrides):
    """The recipe's ConfigContainer with the YAML file's and the command line's overrides."""
    from megatron.bridge.training.utils.omegaconf_utils import (
        apply_overrides, create_omegaconf_dict_config, parse_hydra_overrides)
    from omegaconf import OmegaConf

    from spiral_megatron.bridge import recipes

    cfg = recipes.pretrain_config(flavor)
    recipe_load = cfg.checkpoint.load
    merged, excluded = create_omegaconf_dict_config(cfg)
    if config_file:
        merged = OmegaConf.merge(merged, OmegaConf.load(config_file))
    if overrides:
        merged = parse_hydra_overrides(merged, overrides)
    apply_overrides(cfg, OmegaConf.to_container(merged, resolve=True), excluded)
    if cfg.checkpoint.load == recipe_load:  # not overridden: resume where this run saves
        cfg.checkpoint.load = cfg.checkpoint.save
    return cfg


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        print(f"error: {bad[0]!r} is neither --flavor, --config-file nor a KEY=VALUE override", file=sys.stderr)
        return 2
    import spiral_megatron.bridge  # Megatron-Bridge, with the CPU shim where CUDA is absent
    from megatron.bridge.training.pretrain import pretrain

    cfg = make_config(args.flavor, args.config_file, overrides)
    pretrain(cfg, spiral_megatron.bridge.forward_step)
    return 0


if __name__ == "__main__":  # checkpoint saving re-imports this module in a helper process
    sys.exit(main())
