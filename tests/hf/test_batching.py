"""Left-padded batches in the HF model: prefill and cached decoding give every row the tokens and
logits of the same prompt alone (batch size 1), greedy and with a cache or without, and run as
one batch (the final norm runs once per forward, not once per row)."""

import contextlib

import pytest
import torch

from spiral_megatron import functional_spiral as F
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


@contextlib.contextmanager
def batches(model):
    """The (rows, tokens) the final norm saw while active: one entry per pass (a prefill, a
    decoding step), the whole batch's rows and the call's tokens when they ran as one."""
    seen = []
    handle = model.model.norm.register_forward_hook(lambda module, args, out: seen.append(tuple(out.shape[:2])))
    try:
        yield seen
    finally:
        handle.remove()


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


def test_a_left_padded_batch_without_a_cache_runs_as_one_batch_with_each_rows_values(model_and_prompts, monkeypatch):
    """Training, evaluation and uncached decoding (no cache): the rows realigned to right
    padding run as one batch. Against each prompt alone: logits, every hidden state (zeros on
    the padding, as the row-by-row path leaves them) and the gradients of the summed loss; and
    in training mode, where a forward keeps no cache unless asked, the same runs batched."""
    model, prompts, ids, mask = model_and_prompts
    with batches(model) as seen:
        out = model(ids, attention_mask=mask, labels=ids, use_cache=False, output_hidden_states=True)
    assert seen == [tuple(ids.shape)]
    out.loss.backward()
    batch_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    scored = sum(len(p) - 1 for p in prompts)
    for r, prompt in enumerate(prompts):
        pad = ids.shape[1] - len(prompt)
        alone = model(prompt[None], labels=prompt[None], use_cache=False, output_hidden_states=True)
        (alone.loss * (len(prompt) - 1) / scored).backward()  # the batch's loss: the mean over every scored token
        torch.testing.assert_close(out.logits[r, pad:], alone.logits[0], rtol=0, atol=1e-5)
        assert bool((out.logits[r, :pad] == 0).all())
        for h_batch, h_alone in zip(out.hidden_states, alone.hidden_states, strict=True):
            torch.testing.assert_close(h_batch[r, pad:], h_alone[0], rtol=0, atol=1e-5)
            assert bool((h_batch[r, :pad] == 0).all())
    for k, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(batch_grads[k], p.grad, rtol=0, atol=1e-5 * max(1.0, p.grad.abs().max().item()))
    model.zero_grad()
    model.train()
    try:
        with batches(model) as seen:
            trained = model(ids, attention_mask=mask)
        assert trained.cache is None and seen == [tuple(ids.shape)]
        torch.testing.assert_close(trained.logits, out.logits.detach(), rtol=0, atol=1e-6)
        assert model(ids[:1, -2:], use_cache=True).cache is not None  # asked for: kept
    finally:
        model.eval()


@pytest.mark.parametrize("short", [False, True], ids=["long", "short"])
def test_a_left_padded_batch_prefills_and_decodes_as_one_batch(model_and_prompts, short):
    """The prefill of a left-padded batch (use_cache=True) and every decoding step after it run
    as one batch, each row at its own positions (cache.lengths). Against each prompt alone: the
    prefill's logits and the next tokens' logits, until a chunk of every level closes, at
    different steps in different rows, then 5 tokens per row in one pass (closing one or two
    chunks of a level, depending on the row). Short: prompts that close no chunk of the
    coarsest level (its cached keys hold no latent yet, but the batch's rows)."""
    model, prompts, ids, mask = model_and_prompts
    if short:
        prompts = [prompts[2][:1], prompts[2]]  # 1 and 2 tokens: no chunk of 4 closed
        ids = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), prompts[0]]), prompts[1]])
        mask = torch.tensor([[0, 1], [1, 1]])
    b = len(prompts)
    new, steps = [], []
    with torch.no_grad(), batches(model) as seen:
        out = model(ids, attention_mask=mask, use_cache=True)
        assert out.cache.lengths == [len(p) for p in prompts]
        cache, logits = out.cache, out.logits
        for _ in range(4):  # every level closes a chunk in 4 tokens
            new.append(logits[:, -1].argmax(-1, keepdim=True))  # [b, 1]
            mask = torch.cat([mask, torch.ones_like(new[-1])], 1)
            step = model(new[-1], attention_mask=mask, cache=cache)
            cache, logits = step.cache, step.logits
            steps.append(logits[:, -1])
        piece = torch.randint(1, H.VOCAB, (b, 5), generator=torch.Generator().manual_seed(8))  # [b, 5]
        mask = torch.cat([mask, torch.ones_like(piece)], 1)
        ahead = model(piece, attention_mask=mask, cache=cache).logits  # [b, 5, V]
        assert cache.lengths == [len(p) + 9 for p in prompts]
    assert seen == [(b, ids.shape[1])] + [(b, 1)] * 4 + [(b, 5)], f"(rows, tokens) of each pass: {seen}"
    with torch.no_grad():
        for r, prompt in enumerate(prompts):
            alone = model(torch.cat([prompt, *[t[r] for t in new]])[None], use_cache=False).logits[0]
            prefill = out.logits[r, ids.shape[1] - len(prompt):]
            torch.testing.assert_close(prefill, alone[: len(prompt)], rtol=0, atol=1e-5)
            for k, logits in enumerate(steps):
                torch.testing.assert_close(logits[r], alone[len(prompt) + k], rtol=0, atol=1e-5)
            whole = torch.cat([prompt, *[t[r] for t in new], piece[r]])[None]
            torch.testing.assert_close(ahead[r], model(whole, use_cache=False).logits[0, -5:], rtol=0, atol=1e-5)


def test_a_left_padded_cache_crops_selects_and_repeats_its_rows(model_and_prompts):
    """The Cache API on a batch decoding at each row's own positions: crop back to fewer tokens
    (assisted decoding's), select rows (beam search's reorder) and repeat them; each row then
    decodes as its prompt alone does from the same tokens."""
    model, prompts, ids, mask = model_and_prompts
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        cache, tokens = out.cache, [out.logits[:, -1].argmax(-1, keepdim=True)]
        for _ in range(3):
            mask = torch.cat([mask, torch.ones_like(tokens[-1])], 1)
            tokens.append(model(tokens[-1], attention_mask=mask, cache=cache).logits[:, -1].argmax(-1, keepdim=True))
        cache.crop(-2)  # back to the prompts and the first new token of each row
        assert cache.lengths == [len(p) + 1 for p in prompts]
        cache.batch_select_indices(torch.tensor([2, 0, 2]))
        cache.batch_repeat_interleave(2)
        rows = [2, 2, 0, 0, 2, 2]
        assert cache.lengths == [len(prompts[r]) + 1 for r in rows]
        nxt = torch.stack([tokens[1][r] for r in rows])  # [6, 1]
        logits = model(nxt, attention_mask=torch.ones(6, ids.shape[1] + 2, dtype=torch.long), cache=cache).logits
        for k, r in enumerate(rows):
            alone = model(torch.cat([prompts[r], tokens[0][r], tokens[1][r]])[None], use_cache=False).logits[0]
            torch.testing.assert_close(logits[k, -1], alone[-1], rtol=0, atol=1e-5)


def test_a_left_padded_batch_continues_from_the_cache_generate_returned(model_and_prompts):
    """A second turn: the first `generate`'s sequences plus the same new text for every row,
    decoded from the cache it returned (the new text and the last token in one pass, each row
    from its own position), against the whole sequences without a cache."""
    model, prompts, ids, mask = model_and_prompts
    first = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                           eos_token_id=None, return_dict_in_generate=True)
    assert first.cache.lengths == [len(p) + 2 for p in prompts]  # the last new token is not fed yet
    suffix = torch.randint(1, H.VOCAB, (1, 4), generator=torch.Generator().manual_seed(9)).expand(len(prompts), 4)
    more = torch.cat([first.sequences, suffix], dim=1)
    more_mask = torch.cat([mask, torch.ones(len(prompts), more.shape[1] - mask.shape[1], dtype=torch.long)], dim=1)
    kwargs = dict(attention_mask=more_mask, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    continued = model.generate(more, cache=first.cache, **kwargs)
    assert torch.equal(continued, model.generate(more, use_cache=False, **kwargs))


@contextlib.contextmanager
def eager_attention(model):
    """The model with attn_implementation "eager" (which returns attention weights) while active."""
    model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        model.set_attn_implementation("sdpa")


def assert_rows_attention(batch, alone, r: int, width: int, model, tokens: int):
    """Row r's attention weights in a left-padded batch against its prompt alone (`tokens` of
    its tokens read so far): prelude and coda right-aligned in `width` columns (zeros in
    front); each core level the row's own latents of the chunks it closed, zeros after."""
    c = model.config
    levels = ([None] * c.num_prelude_layers + [t for t in range(len(c.chunk_sizes)) for _ in range(c.num_core_layers)]
              + [None] * c.num_coda_layers)
    assert len(batch) == len(alone) == len(levels)
    for got, want, t in zip(batch, alone, levels):
        if t is None:  # [.., q, keys]: the row's keys are the last of the padded layout
            q, m = want.shape[-2:]
            assert got.shape[-1] == width
            torch.testing.assert_close(got[r, :, -q:, -m:], want[0], rtol=0, atol=1e-6)
            assert not got[r, :, :, :-m].any() and not got[r, :, :-q].any()
            continue
        if want is None:  # no chunk of this level closed: no row's core ran, or not this row's
            assert got is None or not got[r].any()
            continue
        closed = F.closed_chunks(tokens, c.chunk_sizes[t], c.offsets[t])  # latents of closed chunks
        q = min(want.shape[-2], closed)  # alone, a forward also reports its open last chunk's latent
        torch.testing.assert_close(got[r, :, :q, :closed], want[0, :, :q, :closed], rtol=0, atol=1e-6)
        assert not got[r, :, q:].any() and not got[r, :, :, closed:].any()


def test_attention_weights_of_a_left_padded_batch_are_each_prompts_alone(model_and_prompts):
    """output_attentions of a left-padded batch (eager attention), in a forward without a cache,
    at every step of a cached generate and for several tokens in one pass after its prefill:
    each row's weights are its prompt's alone, laid out as the batch's padding lays out its
    tokens (assert_rows_attention)."""
    model, prompts, ids, mask = model_and_prompts
    width = ids.shape[1]
    with eager_attention(model), torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=False, output_attentions=True)
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                             eos_token_id=None, output_attentions=True, return_dict_in_generate=True)
        for r, prompt in enumerate(prompts):
            alone = model(prompt[None], use_cache=False, output_attentions=True).attentions
            assert_rows_attention(out.attentions, alone, r, width, model, len(prompt))
            alone = model.generate(prompt[None], max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                                   eos_token_id=None, output_attentions=True, return_dict_in_generate=True)
            assert torch.equal(gen.sequences[r, width:], alone.sequences[0, len(prompt):]), f"row {r}"
            for k, (got, want) in enumerate(zip(gen.attentions, alone.attentions, strict=True)):  # prefill, then a token a step
                assert_rows_attention(got, want, r, width + k, model, len(prompt) + k)
        # 5 tokens per row in one pass after the prefill: rows close different numbers of chunks
        piece = torch.randint(1, H.VOCAB, (len(prompts), 5), generator=torch.Generator().manual_seed(10))
        cache = model(ids, attention_mask=mask, use_cache=True).cache
        more = model(piece, attention_mask=torch.cat([mask, torch.ones_like(piece)], 1), cache=cache,
                     output_attentions=True).attentions
        for r, prompt in enumerate(prompts):
            cache = model(prompt[None], use_cache=True).cache
            alone = model(piece[r : r + 1], cache=cache, output_attentions=True).attentions
            assert_rows_attention(more, alone, r, width + 5, model, len(prompt) + 5)
