"""A quantized SwiGLU model restored at TP2 computes what it computed at TP1 (the reference):
its fc1 weight is [gate; up] and each TP rank holds [gate_r; up_r], so the per-row weight
scales (int8 SmoothQuant per channel, int4 AWQ per block) must follow the weight's swiglu
sharding (quantization/swiglu_scales.py; sliced plainly on dim 0, a rank's up rows took the
gate's scales). Per-tensor fp8 scales are replicated. A TP size at which AWQ's blocks would
straddle two ranks is refused in one line. One launch for all."""

from pathlib import Path

import pytest
import torch

pytest.importorskip("modelopt.torch.quantization")

from tests.conftest import torchrun  # noqa: E402
from tests.quantization.test_calibration import BATCH, SEQ, VOCAB, batches  # noqa: E402

pytestmark = pytest.mark.checkpoint  # saves or loads a checkpoint

WORKER = Path(__file__).with_name("tp_worker.py")
FORMATS = ("int8_sq", "int4_awq", "fp8")


def swiglu_model(hidden: int = 256):
    from megatron.core import tensor_parallel

    from spiral_megatron.config import flavors
    from spiral_megatron.conversion.megatron_io import build_megatron
    from spiral_megatron.model.model_args import ModelArgs

    tensor_parallel.model_parallel_cuda_manual_seed(7, inference_rng_tracker=True)
    torch.manual_seed(7)
    # int4 AWQ's blocks of 128 inputs must not straddle TP2's shards: 256 = 2 x 128 inputs per rank
    config = flavors.get("debug").config(hidden_size=hidden, ffn_hidden_size=hidden, num_core_layers=1, chunk_sizes=(2, 1),
                                         gated_linear_unit=True, activation_func=torch.nn.functional.silu,
                                         bias_activation_fusion=False)
    args = ModelArgs.from_config(config, vocab_size=VOCAB, max_sequence_length=SEQ)
    return args, build_megatron(args).eval()


def test_quantized_swiglu_scales_follow_the_weight_at_tp2(megatron, tmp_path):
    from megatron.core import dist_checkpointing

    from spiral_megatron.quantization import checkpoint, ptq

    ids = batches(3)[2]  # not a calibration batch
    pos = torch.arange(SEQ)[None].expand(BATCH, -1)
    folders = []
    for fmt, hidden in [(fmt, 256) for fmt in FORMATS] + [("int4_awq", 64)]:
        args, model = swiglu_model(hidden)
        model = ptq.quantize(model, fmt, lambda m: [m(b, pos, None) for b in batches()])
        folder = tmp_path / f"{fmt}-{hidden}"
        folder.mkdir()
        dist_checkpointing.save({"model": model.sharded_state_dict()}, str(folder))
        checkpoint.save_state(model, folder, model.spiral_quant_recipe)
        args.save(folder / "model_args.json")
        torch.save(ids, folder / "ids.pt")
        with torch.no_grad():
            torch.save(model(ids, pos, None, labels=ids), folder / "expected.pt")  # [b, s]
        folders.append(folder)
    out = torchrun(WORKER, 2, *folders)
    differences = {line.split()[1]: float(line.split()[2]) for line in out.splitlines() if line.startswith("LOSS ")}
    assert len(differences) == len(FORMATS), out
    # hidden 64: TP2 gives linear_proj 32 inputs per rank, a part of AWQ's block of 128
    assert (f"REFUSED {tmp_path}/int4_awq-64 int4_awq: prelude.layers.0.self_attention.linear_proj has 32 of its 64 "
            "input features per tensor-parallel rank, not a multiple of the weight blocks of 128") in out, out
    for folder, difference in differences.items():
        assert difference < 1e-5, f"{folder}: the TP2 loss differs from TP1's by {difference}"
