"""Named model configurations ("flavors"), from a CPU debug size to the paper's sizes.

Every flavor takes SpiralConfig's defaults for what the papers fix (docs/MODEL.md): the MeSH
topology, embeddings scaled by sqrt(d) and the output-projection init scaled by the unrolled
depth. Each paper size comes with two baselines of the same unique parameters (docs/MODEL.md
section 1): `looped-*` (every chunk size 1, otherwise the same, MeSH included: a looped
transformer with MeSH; `topology="residual"` gives the classic one) and `gpt-*` (no loop: the
prelude, ONE pass of the core's layers and the coda as plain unshared layers, i.e. the loop
unrolled once; the same unique transformer layers, without the resampling weights).
"""

from dataclasses import dataclass, field
from typing import Dict, Tuple

from spiral_megatron.config.spiral_config import SpiralConfig
from spiral_megatron.errors import ConfigError


@dataclass(frozen=True)
class Flavor:
    """A named model: SpiralConfig fields plus the data shape it is meant for."""

    name: str
    """Registry key, e.g. "spiral-160m"."""

    model: Dict = field(default_factory=dict)
    """SpiralConfig keyword arguments."""

    seq_length: int = 4096
    """Training sequence length."""

    vocab_size: int = 50304
    """Vocabulary (Pythia's tokenizer padded to a multiple of 128)."""

    def config(self, **overrides) -> SpiralConfig:
        """A SpiralConfig of this flavor, with any field overridden."""
        return SpiralConfig(**{**self.model, **overrides})


_COMMON = dict(
    normalization="LayerNorm",
    hidden_dropout=0.0,
    attention_dropout=0.0,
    init_method_std=0.02,
)

_REGISTRY: Dict[str, Flavor] = {}


def _register(flavor: Flavor) -> None:
    _REGISTRY[flavor.name] = flavor


def _paper_size(size: str, hidden: int, heads: int, prelude: int, core: int, coda: int,
                chunk_sizes: Tuple[int, ...]) -> None:
    shape = dict(_COMMON, hidden_size=hidden, num_attention_heads=heads, ffn_hidden_size=4 * hidden)
    loop = dict(num_prelude_layers=prelude, num_core_layers=core, num_coda_layers=coda)
    _register(Flavor(f"spiral-{size}", dict(shape, **loop, chunk_sizes=chunk_sizes)))
    _register(Flavor(f"looped-{size}", dict(shape, **loop, chunk_sizes=(1,) * len(chunk_sizes))))
    _register(Flavor(f"gpt-{size}", dict(shape, num_prelude_layers=prelude + core + coda)))


_register(
    Flavor(
        "debug",
        dict(
            _COMMON,
            hidden_size=64,
            num_attention_heads=4,
            ffn_hidden_size=256,
            num_prelude_layers=1,
            num_core_layers=2,
            num_coda_layers=1,
            chunk_sizes=(8, 4, 2, 1),
        ),
        seq_length=128,
        vocab_size=512,
    )
)
_register(Flavor("looped-debug", dict(_REGISTRY["debug"].model, chunk_sizes=(1, 1, 1, 1)), 128, 512))
_register(
    Flavor("gpt-debug", dict({k: v for k, v in _REGISTRY["debug"].model.items() if k not in
                              ("num_core_layers", "num_coda_layers", "chunk_sizes")},
                             num_prelude_layers=4), 128, 512)
)
_paper_size("160m", 768, 12, 2, 4, 2, (8, 4, 2, 1))
_paper_size("410m", 1024, 16, 4, 8, 4, (8, 4, 2, 1))
_paper_size("1.4b", 2048, 16, 4, 8, 4, (8, 4, 2, 1))


def names() -> Tuple[str, ...]:
    """Every registered flavor name."""
    return tuple(_REGISTRY)


def get(name: str) -> Flavor:
    """The flavor called `name`; a ConfigError lists the known names."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown flavor {name!r}; known flavors: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]
