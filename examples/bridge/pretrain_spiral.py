"""Pretrain a SpiralFormer through Megatron-Bridge's `pretrain()` (docs/BRIDGE.md).

    torchrun --nproc_per_node=2 examples/bridge/pretrain_spiral.py [--flavor debug]
        [--config job.yaml] [--data-path data/mine ...job flags] [--config-file overrides.yaml] [KEY=VALUE ...]

The recipe (`spiral_megatron.bridge.recipes.pretrain_config`) holds the project's defaults for
the flavor, with the project's job flags over them (`--data-path data/mine`,
`--tokenizer-model DIR`, `--split 98,2,0`, `--tensor-model-parallel-size 2`, a job config file
`--config job.yaml`: the names, aliases and checks of examples/pretrain_spiral.py). Bridge's
usual overrides follow, as in Bridge's own examples: a YAML file of ConfigContainer fields, then
Hydra-style `train.train_iters=20 model.tensor_model_parallel_size=2 checkpoint.save=DIR
optimizer.lr=1e-3 model.hidden_size=128`; a field Bridge lacks, or text for a number, is refused.
The data and its tokenizer come in through the job flags only: the recipe takes the tokenizer
written beside the data and a split that fits it, so an override of dataset.blend,
dataset.blend_per_split, dataset.split or tokenizer.* is refused, naming the flag to use. Run
again with the same checkpoint.save to resume: checkpoint.load follows checkpoint.save unless given.
"""

import argparse
import os
import re
import sys

# Bridge fields the recipe derives from the job's data flags (recipes._dataset, _tokenizer):
# overridden alone they disagree with the rest (another tokenizer's token ids, a split of
# another corpus: Megatron-Core then loops forever building an empty split).
DATA_FIELDS = {"dataset.blend": "--data-path", "dataset.blend_per_split": "--train-data-path/--valid-data-path",
               "dataset.split": "--split", "tokenizer": "--tokenizer-model"}
_OVERRIDE = re.compile(r"^[+~]{0,2}[A-Za-z_]\w*(\.\w+)*=")  # Hydra: section.field=value


def parse_args(argv=None):
    """(options, job flags as `--key value` tokens, Hydra overrides)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # --config is a job flag, not --config-file
    p.add_argument("--flavor", default="debug", help="a flavor of spiral_megatron.config.flavors (default debug)")
    p.add_argument("--config-file", default=None, help="YAML of ConfigContainer fields, applied over the recipe")
    args, rest = p.parse_known_args(argv)
    flags, overrides, takes_values = [], [], False
    for token in rest:
        if token.startswith("--"):
            flags.append(token)
            takes_values = "=" not in token
        elif _OVERRIDE.match(token):
            overrides.append(token)
            takes_values = False
        elif takes_values:  # a value of the flag before it (several: `--data-path 0.7 a 0.3 b`)
            flags.append(token)
        else:
            p.error(f"{token!r} is neither a --flag (with its value) nor a KEY=VALUE override")
    return args, flags, overrides


def make_config(flavor: str, config_file, overrides, flags=()):
    """The recipe's ConfigContainer of the job `flags`, with the YAML file's and the command
    line's Bridge overrides."""
    from megatron.bridge.training.utils.omegaconf_utils import (
        OverridesError, apply_overrides, create_omegaconf_dict_config, parse_hydra_overrides)
    from omegaconf import OmegaConf

    from spiral_megatron.bridge import recipes
    from spiral_megatron.job.checkpoint import checkpoint_files
    from spiral_megatron.job.settings import config

    cfg = recipes.pretrain_config(flavor, **config.parse_cli(list(flags)))
    recipe_load = cfg.checkpoint.load
    merged, excluded = create_omegaconf_dict_config(cfg)
    data = {field: _value(merged, field) for field in DATA_FIELDS}
    if config_file:
        fields = OmegaConf.to_container(OmegaConf.load(config_file))
        unknown = list(_unknown(fields, merged)) if isinstance(fields, dict) else ["(not a mapping)"]
        if unknown:  # Bridge would warn and go on without them
            raise config.ConfigError(f"--config-file {config_file}: {', '.join(unknown)}: not a field of Bridge's "
                                     f"ConfigContainer (a config file of the job's keys goes in --config)")
        merged = OmegaConf.merge(merged, fields)
    if overrides:
        before = OmegaConf.to_container(merged, resolve=True)
        try:
            merged = parse_hydra_overrides(merged, overrides)
        except OverridesError as e:  # Bridge's refusal of an override; Hydra's reason is the root cause
            root = e
            while root.__cause__ is not None:
                root = root.__cause__
            raise config.ConfigError(f"{str(e).splitlines()[0].removeprefix('Failed to parse Hydra overrides: ')} "
                                     f"({str(root).splitlines()[0]})") from None
        for name, old, new in _retyped(before, OmegaConf.to_container(merged, resolve=True)):
            kind = {bool: "a boolean", int: "an integer", float: "a number"}[type(old)]
            raise config.ConfigError(f"{name}={new}: {name} takes {kind} ({old!r} in the recipe)")
    for field, flag in DATA_FIELDS.items():
        if _value(merged, field) != data[field]:
            raise config.ConfigError(f"{field}: set by the recipe from the job's data flags; give {flag} instead "
                                     f"(the tokenizer beside the data and a split that fits it come with it)")
    apply_overrides(cfg, OmegaConf.to_container(merged, resolve=True), excluded)
    if cfg.checkpoint.load == recipe_load:  # not overridden: resume where this run saves
        cfg.checkpoint.load = cfg.checkpoint.save
    for field in ("load", "pretrained_checkpoint"):
        folder = getattr(cfg.checkpoint, field)
        if folder and checkpoint_files.holds_job_checkpoint(folder):  # Bridge: "Legacy checkpoint missing 'args'"
            raise config.ConfigError(
                f"checkpoint.{field} {folder!r} holds a checkpoint of examples/pretrain_spiral.py, which Bridge does "
                f"not read: continue it with that job, or convert it (tools/convert_to_hf.py, then "
                f"examples/bridge/convert_checkpoints.py import)")
    return cfg


def _unknown(fields: dict, node, path: str = ""):
    """The dotted names in `fields` (a YAML file's tree) that the OmegaConf tree `node` lacks."""
    from omegaconf import DictConfig

    for key, value in fields.items():
        if not isinstance(node, DictConfig) or key not in node:
            yield f"{path}{key}"
        elif isinstance(value, dict) and isinstance(node[key], DictConfig):
            yield from _unknown(value, node[key], f"{path}{key}.")


def _retyped(old, new, path: str = ""):
    """(name, old, new) for each number or boolean that an override turned into text: Bridge's
    tree carries no types, and `train.train_iters=abc` would reach the trainer as 'abc'."""
    for key, value in new.items() if isinstance(new, dict) and isinstance(old, dict) else ():
        was = old.get(key)
        if isinstance(value, dict):
            yield from _retyped(was, value, f"{path}{key}.")
        elif isinstance(was, (bool, int, float)) and isinstance(value, str):
            yield f"{path}{key}", was, value


def _value(merged, field):
    """The plain value of `field` in an OmegaConf tree (a copy: Hydra's overrides edit the tree)."""
    from omegaconf import Container, OmegaConf

    node = OmegaConf.select(merged, field)
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, Container) else node


def main(argv=None) -> int:
    args, flags, overrides = parse_args(argv)
    import spiral_megatron.bridge  # Megatron-Bridge, with the CPU shim where CUDA is absent
    from megatron.bridge.training.pretrain import pretrain

    from spiral_megatron.errors import SpiralError

    try:
        cfg = make_config(args.flavor, args.config_file, overrides, flags)
    except SpiralError as e:  # the project's own refusals: one line (spiral_megatron/errors.py)
        if os.environ.get("RANK", "0") == "0":  # every rank finds the same
            print(f"pretrain_spiral: error: {e}", file=sys.stderr)
        return 2
    pretrain(cfg, spiral_megatron.bridge.forward_step)
    return 0


if __name__ == "__main__":  # checkpoint saving re-imports this module in a helper process
    sys.exit(main())
