"""The per-token rules decoding reads (functional_spiral: token_chunk, chunk_tokens,
closed_chunks, update_delay) describe what the full iteration computes: each token's update is
that of the chunk the rules name, and that chunk has closed by then. The iteration runs on
marked tokens (token i holds i + 1), with the chunk's sum as down-scale, a doubling core (so the
update is the latent itself) and `repeat` as up-scale: token i's update is the sum of the
tokens of the chunk it receives. Which chunk that must be is SPEC.md's statement of the shift."""

import pytest
import torch

from spiral_megatron import functional_spiral as F

L = 13  # not a multiple of any chunk size below: the end padding is in play


@pytest.mark.parametrize("g,w,shift", [(4, 1, "overlap"), (4, 3, "no-overlap"), (2, 0, "overlap"),
                                       (3, 2, "overlap"), (1, 0, "overlap"), (1, 0, "no-overlap")])
def test_rules_name_the_chunk_each_token_receives(g, w, shift):
    s = F.shift_of(g, shift)
    S = F.padded_length(L, [g])
    h = F.pad_to(torch.arange(1.0, L + 1)[:, None], S, dim=0)  # [S, 1]: token i holds i + 1
    u = F.iteration(h, g, w, s, dim=0, core=lambda z: 2 * z,
                    downscale=lambda chunks, pad: chunks.sum(dim=1),  # [S/g, 1]
                    upscale=lambda y, delta, k: F.repeat(delta, g, dim=0, shift=k))
    u = F.crop_to(u, L, dim=0)[:, 0]  # [L]
    for i in range(L):
        j, k = F.token_chunk(i, g, w)
        start, stop = F.chunk_tokens(j, g, w)
        assert start + k == i and stop - start == g  # token i is slot k of chunk j
        m = i - F.update_delay(s, w)  # the x-position whose update token i receives
        if m < 0:
            assert u[i] == 0, i
            continue
        jm = m // g
        # SPEC.md 3.4: the newest chunk whose tokens are all at or before token i (overlap, s = g - 1),
        # or all before it (no-overlap, s = g)
        assert jm == F.closed_chunks(i + 1 if shift == "overlap" else i, g, w) - 1, i
        a, b = F.chunk_tokens(jm, g, w)
        assert u[i] == sum(t + 1 for t in range(max(a, 0), b)), (i, jm)
