"""docs/MODEL.md section 4, causality: nothing at position i depends on a position j > i.

For every option and their combinations: (1) d logits[i] / d h0[j] is exactly zero for
j > i, where h0 is the embedding output; (2) logits at i are bit-identical when tokens
after i change. Both are checked against non-vacuity: position i does depend on j <= i.
"""

import pytest
import torch

from tests.tiny import VOCAB, tiny_model

SEQ = 32
CASES = {
    # name: SpiralConfig overrides
    "default-8421": {},
    "16-8-4-2-1": dict(chunk_sizes=(16, 8, 4, 2, 1)),
    "fine-to-coarse": dict(chunk_sizes=(1, 2, 4, 8)),
    "offsets": dict(chunk_offsets=(3, 1, 1, 0)),
    "offsets-16": dict(chunk_sizes=(16, 8, 4, 2, 1), chunk_offsets=(5, 7, 0, 1, 0)),
    "offsets-fine-to-coarse": dict(chunk_sizes=(1, 2, 4, 8), chunk_offsets=(0, 1, 3, 5)),
    "no-overlap": dict(shift="no-overlap"),
    "no-overlap-offsets": dict(shift="no-overlap", chunk_offsets=(7, 2, 1, 0)),
    "index-positions": dict(latent_positions="index", chunk_offsets=(2, 0, 1, 0)),
    "odd-length-schedule": dict(chunk_sizes=(3, 5, 1)),
}
for topology in ("residual", "anchor", "mesh"):
    for down in ("self-aggregation", "mean"):
        for up in ("allocate", "repeat"):
            CASES[f"{topology}-{down}-{up}"] = dict(topology=topology, downscale=down, upscale=up)
    CASES[f"{topology}-offsets-no-overlap-16"] = dict(
        topology=topology, chunk_sizes=(16, 8, 4, 2, 1), chunk_offsets=(9, 3, 2, 1, 0), shift="no-overlap"
    )


@pytest.mark.parametrize("seq", [SEQ, 29], ids=["seq32", "seq29-padded"])
@pytest.mark.parametrize("case", list(CASES))
def test_gradient_never_flows_from_the_future(megatron, case, seq):
    model = tiny_model(**CASES[case])
    h0 = torch.randn(seq, 1, 32, requires_grad=True)  # [s, b, h]: the embedding output
    logits = model(None, None, None, decoder_input=h0)[0]  # [s, V]
    probe = torch.randn(VOCAB)
    for i in range(seq):
        (grad,) = torch.autograd.grad(logits[i] @ probe, h0, retain_graph=True)  # [s, 1, h]
        future = grad[i + 1 :].abs().max().item() if i + 1 < seq else 0.0
        assert future == 0.0, f"{case}: logit {i} has gradient {future:g} from a later position"
        assert grad[i].abs().max() > 0, f"{case}: logit {i} does not depend on its own position"


@pytest.mark.parametrize("case", list(CASES))
def test_logits_ignore_later_tokens(megatron, case):
    model = tiny_model(**CASES[case])
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    positions = torch.arange(SEQ).expand(2, SEQ)
    with torch.no_grad():
        base = model(tokens, positions, None)  # [b, s, V]
        for i in (0, 5, 7, 8, 15, 16, 23, SEQ - 2):
            changed = tokens.clone()
            changed[:, i + 1 :] = (changed[:, i + 1 :] + 1 + torch.randint(0, VOCAB - 1, changed[:, i + 1 :].shape)) % VOCAB
            after = model(changed, positions, None)
            torch.testing.assert_close(after[:, : i + 1], base[:, : i + 1], rtol=0, atol=0,
                                       msg=lambda m: f"{case}: change after {i} moved logits at <= {i}: {m}")
            assert not torch.equal(after[:, i + 1 :], base[:, i + 1 :]), f"{case}: later logits did not change"


@pytest.mark.parametrize("case", ["default-8421", "mesh-self-aggregation-allocate", "offsets-16"])
def test_samples_of_a_batch_do_not_mix(megatron, case):
    """Another sequence of the micro-batch never changes a sequence's logits."""
    model = tiny_model(**CASES[case])
    tokens = torch.randint(0, VOCAB, (3, SEQ))
    positions = torch.arange(SEQ).expand(3, SEQ)
    with torch.no_grad():
        base = model(tokens, positions, None)
        other = tokens.clone()
        other[1:] = torch.randint(0, VOCAB, (2, SEQ))
        torch.testing.assert_close(model(other, positions, None)[0], base[0], rtol=0, atol=0)
