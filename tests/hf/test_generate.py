"""Every `generate` strategy that uses the cache, through transformers' own entry points, against
references that do not: beam search (with num_return_sequences, on left-padded batches) against
the search without a cache and its scores against the sequences' log-probabilities from a full
forward; assisted and prompt-lookup decoding (which crop the cache) against greedy decoding without
a cache; a crop to every length against the full forward; a prompt cache passed back in and the
cache `return_dict_in_generate` returns, against decoding from scratch. Weights of std 0.3 make
beams and the assistant disagree with greedy decoding (asserted), so reorders and crops matter."""

import copy
import sys

import pytest
import torch

from tests.hf import helpers as H
from tests.hf.conftest import load, randomize



def tolerance(logits: torch.Tensor) -> float:
    """float32, cached vs uncached logits: 5e-5 of their scale (this model's differ by 3e-5 of it:
    std 0.3 weights and a loop with MeSH make |logits| ~7)."""
    return 5e-5 * max(1.0, logits.abs().max().item())
GEN = dict(do_sample=False, pad_token_id=0, eos_token_id=None)


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, H.VOCAB, (n,), generator=g) for n in lengths]


def left_pad(rows):
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    return ids, mask


def log_prob(model, sequence: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """sum over the generated tokens of log softmax of a full uncached forward: [b]."""
    with torch.no_grad():
        lp = torch.log_softmax(model(sequence, use_cache=False).logits.float(), dim=-1)
    new = sequence[:, prompt_len:]
    return lp[:, prompt_len - 1 : -1].gather(-1, new[..., None]).squeeze(-1).sum(-1)


def check_step_logits(model, out, prompt_len: int, what: str, mask=None) -> None:
    """generate's logits of each new token (output_logits) against a full uncached forward."""
    steps = torch.stack(out.logits, dim=1)  # [b, new, V]
    if mask is not None:
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], out.sequences.shape[1] - mask.shape[1])], dim=1)
    with torch.no_grad():
        full = model(out.sequences, attention_mask=mask, use_cache=False).logits[:, prompt_len - 1 : -1]
    print(f"\n{what}: max |generate's logits - full forward's| = {(steps - full).abs().max():.1e}, "
          f"|logits| <= {full.abs().max():.1f}")
    torch.testing.assert_close(steps, full, rtol=0, atol=tolerance(full))


def beams(model, ids, mask=None, use_cache=True, new=8):
    return model.generate(ids, attention_mask=mask, max_new_tokens=new, num_beams=4, num_return_sequences=2,
                          length_penalty=0.0, use_cache=use_cache, return_dict_in_generate=True, output_scores=True,
                          **GEN)


def test_beam_search_with_the_cache_is_the_search_without_and_scores_are_log_probs(model):
    ids = torch.stack(prompts([7, 7]))
    cached, uncached = beams(model, ids), beams(model, ids, use_cache=False)
    switched = (cached.beam_indices[:, 1:] != cached.beam_indices[:, :-1]) & (cached.beam_indices[:, 1:] >= 0)
    assert bool(switched.any()), "beams never changed parent: the cache was never reordered"
    assert torch.equal(cached.sequences, uncached.sequences)
    true = log_prob(model, cached.sequences, ids.shape[1])
    print(f"\nbeam search: max |sequences_scores - log-prob| cached {(cached.sequences_scores - true).abs().max():.1e}, "
          f"uncached {(uncached.sequences_scores - true).abs().max():.1e} (log-probs {true.min():.1f}..{true.max():.1f})")
    torch.testing.assert_close(cached.sequences_scores, true, rtol=0, atol=1e-4)
    torch.testing.assert_close(uncached.sequences_scores, true, rtol=0, atol=1e-4)


@pytest.mark.parametrize("strategy", ["greedy", "sample", "left-padded greedy"])
def test_greedy_and_sampling_logits_are_the_full_forwards(model, strategy):
    rows = prompts([7, 4] if strategy.startswith("left") else [7, 7], seed=12)
    ids, mask = left_pad(rows)
    torch.manual_seed(0)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=9, output_logits=True, return_dict_in_generate=True,
                         **{**GEN, "do_sample": strategy == "sample"})
    check_step_logits(model, out, ids.shape[1], strategy, mask if strategy.startswith("left") else None)


def test_beam_search_on_a_left_padded_batch_is_each_prompt_alone(model):
    rows = prompts([5, 9, 2], seed=3)
    ids, mask = left_pad(rows)
    batch = beams(model, ids, mask)
    for r, prompt in enumerate(rows):
        alone = beams(model, prompt[None], use_cache=False)  # no padding, no cache
        got = batch.sequences[2 * r : 2 * r + 2, ids.shape[1]:]
        assert torch.equal(got, alone.sequences[:, len(prompt):]), f"row {r}"
        true = log_prob(model, alone.sequences, len(prompt))
        print(f"\nleft-padded beam search, row {r}: max |sequences_scores - log-prob alone| = "
              f"{(batch.sequences_scores[2 * r : 2 * r + 2] - true).abs().max():.1e}")
        torch.testing.assert_close(batch.sequences_scores[2 * r : 2 * r + 2], true, rtol=0, atol=1e-4)


@pytest.fixture
def crops(model, monkeypatch):
    """Every crop a generate call makes on a SpiralCache (tokens_to_remove, <= 0)."""
    cache_module = sys.modules[type(model).__module__.rsplit(".", 1)[0] + ".cache_spiral"]
    calls, crop = [], cache_module.SpiralCache.crop

    def spy(self, tokens_to_remove):
        calls.append(tokens_to_remove)
        return crop(self, tokens_to_remove)

    monkeypatch.setattr(cache_module.SpiralCache, "crop", spy)
    return calls


def test_assisted_decoding_is_greedy_decoding(model, folder, crops):
    ids = prompts([6], seed=5)[0][None]
    assistant = randomize(load(folder), seed=7)
    greedy = model.generate(ids, max_new_tokens=14, use_cache=False, **GEN)
    assert not torch.equal(assistant.generate(ids, max_new_tokens=14, use_cache=False, **GEN), greedy)
    assisted = model.generate(ids, max_new_tokens=14, assistant_model=assistant, output_logits=True,
                              return_dict_in_generate=True, **GEN)
    assert torch.equal(assisted.sequences, greedy)
    check_step_logits(model, assisted, ids.shape[1], "assisted decoding")
    assert any(k < 0 for k in crops), f"no draft was rejected (crops {crops}): the test checks nothing"


def test_prompt_lookup_decoding_is_greedy_decoding(model, crops):
    ids = torch.cat([prompts([5], seed=8)[0]] * 3)[None]  # repeated n-grams: lookup proposes drafts
    greedy = model.generate(ids, max_new_tokens=14, use_cache=False, **GEN)
    lookup = model.generate(ids, max_new_tokens=14, prompt_lookup_num_tokens=3, output_logits=True,
                            return_dict_in_generate=True, **GEN)
    assert torch.equal(lookup.sequences, greedy)
    check_step_logits(model, lookup, ids.shape[1], "prompt lookup decoding")
    assert any(k < 0 for k in crops), f"no draft was rejected (crops {crops}): the test checks nothing"


def test_stop_strings_stop_where_decoding_without_them_reaches_the_string(model, folder):
    """generate(stop_strings=..., tokenizer=tok), transformers' StopStringCriteria: generate hands
    `tokenizer` on with the model's inputs. Greedy stops right after the first new token that
    is the string; beam search with the cache stops as the search without it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # the folder's word-level vocabulary with a word for the prefix StopStringCriteria tokenizes
    words = ["<|endoftext|>", "abcdef"] + [f"w{i}" for i in range(H.VOCAB - 3)] + ["[UNK]"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    ids = prompts([6], seed=9)[0][None]
    n = ids.shape[1]
    full = model.generate(ids, max_new_tokens=12, use_cache=False, **GEN)
    stop = tok.convert_ids_to_tokens(int(full[0, n + 3]))
    first = next(k for k in range(12) if full[0, n + k] == full[0, n + 3])
    greedy = model.generate(ids, max_new_tokens=12, stop_strings=[stop], tokenizer=tok, **GEN)
    assert torch.equal(greedy, full[:, : n + first + 1])
    search = dict(max_new_tokens=12, num_beams=3, stop_strings=[stop], tokenizer=tok, **GEN)
    assert torch.equal(model.generate(ids, **search), model.generate(ids, use_cache=False, **search))


def test_cache_implementations_other_than_the_models_own_are_refused(model):
    """transformers would warn and ignore a `cache_implementation` this model cannot take;
    "dynamic", what SpiralCache is, decodes as the default does."""
    ids = prompts([5], seed=10)[0][None]
    default = model.generate(ids, max_new_tokens=6, **GEN)
    assert torch.equal(model.generate(ids, max_new_tokens=6, cache_implementation="dynamic", **GEN), default)
    for implementation in ("static", "offloaded", "quantized"):
        with pytest.raises(ValueError, match=f"^cache_implementation '{implementation}' is not supported: "
                                             "SpiralForCausalLM decodes with its own SpiralCache"):
            model.generate(ids, max_new_tokens=6, cache_implementation=implementation, **GEN)


def decode(model, ids, cache, start: int) -> torch.Tensor:
    """Logits [b, n - start, V] of feeding ids[:, start:] one token at a time into `cache`."""
    return torch.cat([model(ids[:, k : k + 1], cache=cache).logits for k in range(start, ids.shape[1])], dim=1)


def test_crop_to_every_length_is_exact(model):
    """Cut back to `keep` tokens, the cache decodes exactly (bit for bit) as one that never went
    past `keep`, and like the full forward, for every keep across every level's chunk boundaries."""
    ids, prefill = torch.stack(prompts([15, 15], seed=9)), 3
    n = ids.shape[1]
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = model(ids[:, :prefill], use_cache=True).cache
        decode(model, ids, cache, prefill)
        worst = 0.0
        for keep in range(1, n):
            cropped = copy.deepcopy(cache)
            cropped.crop(keep - n)
            assert cropped.get_seq_length() == keep
            steps = decode(model, ids, cropped, keep)
            worst = max(worst, (steps - full[:, keep:]).abs().max().item())
            torch.testing.assert_close(steps, full[:, keep:], rtol=0, atol=tolerance(full), msg=f"keep {keep}")
            if keep >= prefill:
                never_past = model(ids[:, :prefill], use_cache=True).cache
                for k in range(prefill, keep):
                    model(ids[:, k : k + 1], cache=never_past)
                assert torch.equal(steps, decode(model, ids, never_past, keep)), f"keep {keep}"
    print(f"\ncrop to 1..{n - 1} of {n} tokens: max |decoded - full forward| = {worst:.1e}; bit-exact for keep >= {prefill}")


def test_several_new_tokens_after_a_filled_cache_run_in_one_pass(model):
    """n new tokens against a filled cache (assisted decoding's check, a prompt cache continued,
    a prefill in pieces) run as one pass, however many chunks of each level they close, and give
    the full forward's logits; also after a crop back into an earlier piece."""
    ids = torch.stack(prompts([40, 40], seed=14))
    pieces = [3, 1, 5, 9, 2, 10]  # chunk sizes 4, 2, 1: pieces closing none, one and several chunks
    seen = []
    handle = model.model.norm.register_forward_hook(lambda module, args, out: seen.append(out.shape[1]))
    try:
        with torch.no_grad():
            full = model(ids, use_cache=False).logits
            seen.clear()
            cache, got, start = None, [], 0
            for n in pieces:
                out = model(ids[:, start : start + n], cache=cache, use_cache=True)
                cache, start = out.cache, start + n
                got.append(out.logits)
            cache.crop(-6)  # back into the last piece
            start -= 6
            got[-1] = got[-1][:, :-6]
            got.append(model(ids[:, start:], cache=cache).logits)
    finally:
        handle.remove()
    assert seen == [*pieces, ids.shape[1] - start], f"tokens per pass: {seen}"
    torch.testing.assert_close(torch.cat(got, dim=1), full, rtol=0, atol=tolerance(full))


def test_rows_selected_and_repeated_in_the_cache_decode_as_those_rows(model):
    ids = torch.stack(prompts([9, 9], seed=13))
    with torch.no_grad():
        cache = model(ids[:, :6], use_cache=True).cache
        cache.batch_repeat_interleave(2)  # rows 0, 0, 1, 1
        cache.batch_select_indices(torch.tensor([3, 0]))  # rows 1, 0
        picked = ids[[1, 0]]
        full = model(picked, use_cache=False).logits
        torch.testing.assert_close(decode(model, picked, cache, 6), full[:, 6:], rtol=0, atol=tolerance(full))


def test_a_prompt_cache_passed_back_and_the_returned_cache_continue_decoding(model):
    prompt = torch.stack(prompts([6, 6], seed=10))
    ids = torch.cat([prompt, torch.stack(prompts([3, 3], seed=11))], dim=1)
    with torch.no_grad():
        prompt_cache = model(prompt, use_cache=True).cache
    reference = model.generate(ids, max_new_tokens=8, use_cache=False, **GEN)
    reused = model.generate(ids, max_new_tokens=8, cache=copy.deepcopy(prompt_cache), output_logits=True,
                            return_dict_in_generate=True, **GEN)
    assert torch.equal(reused.sequences, reference)
    check_step_logits(model, reused, ids.shape[1], "prompt cache reused")
    with pytest.warns(FutureWarning, match="past_key_values"):  # transformers' older name for `cache`
        reused = model.generate(ids, max_new_tokens=8, past_key_values=copy.deepcopy(prompt_cache), **GEN)
    assert torch.equal(reused, reference)

    out = model.generate(ids, max_new_tokens=4, return_dict_in_generate=True, **GEN)
    assert out.cache.get_seq_length() == out.sequences.shape[1] - 1  # the last token is not fed yet
    more = model.generate(out.sequences, max_new_tokens=5, cache=out.cache, **GEN)
    assert torch.equal(more, model.generate(out.sequences, max_new_tokens=5, use_cache=False, **GEN))



@pytest.mark.parametrize("search", ["greedy", "beams"])
def test_a_prompt_given_as_embeddings_decodes_as_without_a_cache(model, search):
    """generate(inputs_embeds=...) (soft prompts, a vision encoder's tokens): the embeddings feed
    the first step, the new tokens' ids the next. Against: the token prompt, and a soft prompt
    (embeddings moved off every token) decoded without a cache; a left-padded batch."""
    ids, mask = left_pad(prompts([6, 3], seed=9))
    kw = dict(attention_mask=mask, max_new_tokens=7, **GEN, **({"num_beams": 3} if search == "beams" else {}))
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)  # [b, n, d]
        assert torch.equal(model.generate(inputs_embeds=embeds, **kw), model.generate(ids, **kw)[:, ids.shape[1]:])
        soft = embeds + 0.5 * torch.randn(embeds.shape, generator=torch.Generator().manual_seed(0))
        cached = model.generate(inputs_embeds=soft, **kw)
        assert torch.equal(cached, model.generate(inputs_embeds=soft, use_cache=False, **kw))
        assert not torch.equal(cached, model.generate(ids, **kw)[:, ids.shape[1]:]), "the soft prompt changed nothing"

STANDALONE = """
import os, sys
sys.modules["spiral_megatron"] = None  # the folder's own files only
import torch
from transformers import AutoModelForCausalLM
folder, saved = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
model.save_pretrained(saved)  # copies the model's files, functional_spiral.py included
model = AutoModelForCausalLM.from_pretrained(saved, trust_remote_code=True).eval()
ids = torch.arange(1, 8)[None]
kw = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0, eos_token_id=None)
assert torch.equal(model.generate(ids, **kw), model.generate(ids, use_cache=False, **kw))
print(" ".join(sorted(os.listdir(saved))))
"""


def test_the_folder_runs_and_saves_without_spiral_megatron(folder, tmp_path):
    import os
    import subprocess

    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH="")
    proc = subprocess.run([sys.executable, "-c", STANDALONE, str(folder), str(tmp_path / "saved")], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "functional_spiral.py" in proc.stdout.split() and "cache_spiral.py" in proc.stdout.split()
