"""tools/probe.py: the statistics' definitions on models built to attend in known ways, and the
same numbers from a Megatron checkpoint and from its HF conversion."""

import json
import math
import sys

import pytest
import torch

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import probe as probe_tool  # noqa: E402

from spiral_megatron.analysis import probe  # noqa: E402

pytestmark = pytest.mark.checkpoint  # saves or loads a checkpoint


def _hf_model(seed=0, **overrides):
    """A random HF SpiralFormer (weights std 0.3, norms 1) of 1+2R3+1, d=32, 4 heads."""
    from spiral_megatron.hf.configuration_spiral import SpiralFormerConfig
    from spiral_megatron.hf.modeling_spiral import SpiralForCausalLM

    cfg = dict(vocab_size=40, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_core_layers=2,
               chunk_sizes=[4, 2, 1], max_position_embeddings=64)
    torch.manual_seed(seed)
    model = SpiralForCausalLM(SpiralFormerConfig(**{**cfg, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name and name.endswith("weight") else 0.3 * torch.randn_like(p))
    return model


def test_head_sums_of_identity_and_uniform_attention():
    n, g, W = 6, 4, 8
    eye = torch.eye(n)[None, None]  # [1, 1, n, n]
    s = probe.head_sums(eye, g, 0, n * g, W)
    assert s["count"].item() == n and s["local_mass"].item() == n
    assert s["entropy"].item() == 0 and s["distance"].item() == 0
    uniform = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]
    s = probe.head_sums(uniform[None, None], g, 0, n * g, W)
    i = torch.arange(n, dtype=torch.float64)
    torch.testing.assert_close(s["entropy"], torch.log(i + 1).sum()[None])
    torch.testing.assert_close(s["distance"], (g * i / 2).sum()[None])  # mean of (i - j) * g over j <= i
    local = sum(min(i_ + 1, math.ceil(W / g)) / (i_ + 1) for i_ in range(n))  # keys closer than W tokens
    torch.testing.assert_close(s["local_mass"], torch.tensor([local], dtype=torch.float64))
    # a query whose chunk reaches past the real tokens is left out
    assert probe.head_sums(eye, g, 0, n * g - 1, W)["count"].item() == n - 1


def test_core_attending_only_to_itself_gives_local_mass_one_and_entropy_zero():
    model = _hf_model(qk_layernorm=True)
    with torch.no_grad():
        for layer in model.model.loop.core.layers:  # q = 1000 * k for the same token: self is the argmax
            a = layer.self_attn
            a.k_proj.weight.copy_(a.q_proj.weight)
            a.k_proj.bias.copy_(a.q_proj.bias)
            a.q_norm.weight.fill_(1000.0), a.k_norm.weight.fill_(1.0)
            a.q_norm.bias.zero_(), a.k_norm.bias.zero_()
    p = probe.Probe(model, window=1)
    p.add(torch.randint(0, 40, (3, 24), generator=torch.Generator().manual_seed(0)))
    per_head = p.per_head()
    torch.testing.assert_close(per_head["local_mass"], torch.ones_like(per_head["local_mass"]))
    assert per_head["entropy"].abs().max() < 1e-4 and per_head["distance"].abs().max() < 1e-4


def test_uniform_core_attention_has_token_distances_at_every_resolution():
    """q = 0: every query attends uniformly to its causal latents; mean distance = g * i / 2."""
    model = _hf_model()
    with torch.no_grad():
        for layer in model.model.loop.core.layers:
            layer.self_attn.q_proj.weight.zero_(), layer.self_attn.q_proj.bias.zero_()
    L = 24
    p = probe.Probe(model, window=4)
    p.add(torch.randint(0, 40, (2, L), generator=torch.Generator().manual_seed(1)))
    per_head = p.per_head()
    for t, g in enumerate([4, 2, 1]):
        i = torch.arange(L // g, dtype=torch.float64)
        expected = (g * i / 2).mean()
        torch.testing.assert_close(per_head["distance"][t], torch.full((2, 4), expected.item(), dtype=torch.float64))
        torch.testing.assert_close(per_head["entropy"][t], torch.full((2, 4), torch.log(i + 1).mean().item(),
                                                                       dtype=torch.float64))


def test_state_diagnostics_are_well_formed():
    model = _hf_model(topology="mesh")
    p = probe.Probe(model)
    p.add(torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(2)))
    st = p.result()["states"]
    cka = torch.tensor(st["cka"], dtype=torch.float64)
    assert cka.shape == (4, 4)
    torch.testing.assert_close(cka.diagonal(), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(cka, cka.T)
    assert ((cka >= -1e-9) & (cka <= 1 + 1e-9)).all()
    spec = torch.tensor(st["spectrum"], dtype=torch.float64)
    torch.testing.assert_close(spec.sum(-1), torch.ones(4, dtype=torch.float64))
    assert all(0 <= u <= 2 for u in st["relative_update"]) and len(st["relative_update"]) == 3
    assert "iteration" not in vars(model.model.loop)  # the recording wrappers are gone


def test_top_changing_heads():
    local = torch.zeros(3, 2, 5)
    local[:, 1, 3] = torch.tensor([0.0, 1.0, 0.0])  # changes most
    local[:, 0, 2] = torch.tensor([0.0, 0.5, 0.5])
    assert probe.top_changing_heads(local, 0.2) == [(0, 2), (1, 3)]


def test_probe_same_from_checkpoint_and_its_hf_conversion(checkpoint, hf_folder, corpus, tmp_path, capsys):
    common = ["--data", str(corpus), "--samples", "6", "--seq-length", "24", "--batch-size", "4", "--window", "4"]
    assert probe_tool.main(["--model", str(checkpoint), "--out", str(tmp_path / "m"), *common]) == 0
    assert probe_tool.main(["--model", str(hf_folder), "--out", str(tmp_path / "h"), *common]) == 0
    a, b = (json.loads((tmp_path / d / "probe.json").read_text()) for d in ("m", "h"))
    assert a["samples"] == 6 and a["chunk_sizes"] == [4, 2, 1]
    for key in ("attention", "states"):
        assert a[key] == b[key]  # the same model: the same numbers exactly
    assert (tmp_path / "m" / "probe_attention.png").stat().st_size > 0
    assert (tmp_path / "m" / "probe_states.png").stat().st_size > 0
    # --device: where the model and the state moments run; one this machine lacks is one line
    assert probe_tool.main(["--model", str(hf_folder), "--out", str(tmp_path / "c"), "--device", "cpu", *common]) == 0
    assert json.loads((tmp_path / "c" / "probe.json").read_text())["states"] == b["states"]
    assert probe_tool.main(["--model", str(hf_folder), "--out", str(tmp_path / "x"), "--device", "nowhere", *common]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("probe: error: --device 'nowhere'")


def test_probe_errors_name_the_problem(tmp_path, capsys):
    assert probe_tool.main(["--model", str(tmp_path / "nope"), "--data", "x.jsonl", "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
