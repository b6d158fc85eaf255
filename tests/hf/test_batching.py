"""Left-padded batches in the HF model: prefill and cached decoding give every row the tokens and
logits of the same prompt alone (batch size 1), greedy and with a cache or without."""

import pytest
import torch

from tests.hf import helpers as H
from tests.hf.test_parity import hf_from_megatron

# offsets and chunk sizes whose boundaries the padding would move if rows were not re-aligned
CONFIG = dict(chunk_sizes=[4, 2, 1], chunk_offsets=[1, 1, 0], topology="mesh")
LENGTHS = (5, 9, 2)
NEW = 9


@pytest.fixture(scope="module")
def model_and_prompts(megatron):
    args = H.model_args(**CONFIG)
    hf = hf_from_megatron(args, H.build(args, seed=4))
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(1, H.VOCAB, (n,), generator=g) for n in LENGTHS]
    width = max(LENGTHS)
    ids = torch.zeros(len(LENGTHS), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = p
        mask[r, width - len(p):] = 1
    return hf, prompts, ids, mask


def generate(model, ids, mask=None, use_cache=True):
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, use_cache=use_cache,
                          pad_token_id=0, eos_token_id=None, output_logits=True, return_dict_in_generate=True)


@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "uncached"])
def test_left_padded_batch_generates_what_each_prompt_does_alone(model_and_prompts, use_cache):
    model, prompts, ids, mask = model_and_prompts
    batch = generate(model, ids, mask, use_cache)
    steps = torch.stack(batch.logits, dim=1)  # [b, NEW, V]
    for r, prompt in enumerate(prompts):
        alone = generate(model, prompt[None], use_cache=use_cache)
        assert torch.equal(batch.sequences[r, ids.shape[1]:], alone.sequences[0, len(prompt):]), f"row {r}"
        torch.testing.assert_close(steps[r], torch.stack(alone.logits, dim=1)[0], rtol=0, atol=1e-5)


def test_prefill_logits_of_a_left_padded_batch(model_and_prompts):
    model, prompts, ids, mask = model_and_prompts
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        for r, prompt in enumerate(prompts):
            alone = model(prompt[None], use_cache=False).logits[0]
            torch.testing.assert_close(out.logits[r, ids.shape[1] - len(prompt):], alone, rtol=0, atol=1e-5)
            assert bool((out.logits[r, : ids.shape[1] - len(prompt)] == 0).all())  # padding gets no logits
    # guard: the same padded rows WITHOUT the mask are chunked differently, and it shows
    with torch.no_grad():
        unmasked = model(ids, use_cache=False).logits
    assert not torch.allclose(unmasked[0, -1], out.logits[0, -1], atol=1e-3)


def test_beam_search_on_a_left_padded_batch_runs(model_and_prompts):
    model, prompts, ids, mask = model_and_prompts
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=2, do_sample=False, pad_token_id=0,
                         eos_token_id=None)
    assert out.shape == (len(prompts), ids.shape[1] + 4)
    for r, prompt in enumerate(prompts):  # beam search of each prompt alone picks the same tokens
        alone = model.generate(prompt[None], max_new_tokens=4, num_beams=2, do_sample=False, pad_token_id=0,
                               eos_token_id=None)
        assert torch.equal(out[r, ids.shape[1]:], alone[0, len(prompt):])
