"""What `forward` takes from transformers, and nothing silently: hidden states and attention
weights (per docs/HF.md; in generate too), return_dict, the loss over left-padded rows and with
`num_items_in_batch`, position_ids, inputs_embeds, logits_to_keep; unknown arguments refused by
name. References: the full uncached forward, each row alone, the probe's own attention formula
(spiral_megatron/analysis/probe.py) and plain cross-entropy."""

import math

import pytest
import torch

from tests.hf.conftest import CONFIG, load
from tests.hf.test_generate import GEN, left_pad, prompts, tolerance

NUM_HIDDEN = 1 + CONFIG["num_prelude_layers"] + len(CONFIG["chunk_sizes"]) + CONFIG["num_coda_layers"]
NUM_CALLS = CONFIG["num_prelude_layers"] + len(CONFIG["chunk_sizes"]) * CONFIG["num_core_layers"] + CONFIG["num_coda_layers"]


@pytest.fixture(scope="module")
def eager(folder):
    return load(folder, attn_implementation="eager")


def test_unknown_arguments_are_refused_by_name(model):
    ids = torch.stack(prompts([6]))
    for name in ("token_type_ids", "cache_position", "fancy_option"):
        with pytest.raises(TypeError, match=name):
            model(ids, **{name: torch.zeros_like(ids)})
    with pytest.raises(TypeError, match="DynamicCache"):
        from transformers import DynamicCache

        model(ids, cache=DynamicCache())
    with pytest.raises(ValueError, match="eager"):
        model(ids, output_attentions=True)  # sdpa computes no weights


def test_hidden_states_are_the_embeddings_then_each_layer_and_iteration(model):
    ids, mask = left_pad(prompts([9, 5], seed=1))
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_hidden_states=True)
        alone = model(ids[1:, 4:], output_hidden_states=True, use_cache=False)
    hs = out.hidden_states
    assert len(hs) == NUM_HIDDEN and all(h.shape == (2, 9, CONFIG["hidden_size"]) for h in hs)
    emb = model.get_input_embeddings()(ids) * math.sqrt(CONFIG["hidden_size"])
    torch.testing.assert_close(hs[0][0], emb[0])
    torch.testing.assert_close(model.lm_head(hs[-1]), out.logits)  # the last one is after the final norm
    for a, b in zip(hs, alone.hidden_states):  # a left-padded row: its states alone, zeros at padding
        torch.testing.assert_close(a[1, 4:], b[0], rtol=0, atol=tolerance(b))
        assert not a[1, :4].any()


def test_generate_returns_each_steps_hidden_states(model):
    ids = torch.stack(prompts([6, 6], seed=2))
    out = model.generate(ids, max_new_tokens=5, output_hidden_states=True, return_dict_in_generate=True, **GEN)
    with torch.no_grad():
        full = model(out.sequences[:, :-1], use_cache=False, output_hidden_states=True).hidden_states
    steps = [torch.cat(entry, dim=1) for entry in zip(*out.hidden_states)]  # per entry: [b, n - 1, d]
    assert len(steps) == NUM_HIDDEN
    for got, want in zip(steps, full):
        torch.testing.assert_close(got, want, rtol=0, atol=tolerance(want))


def test_attention_weights_with_eager_attention(model, eager):
    from spiral_megatron.analysis import probe

    ids = torch.stack(prompts([11], seed=3))
    with torch.no_grad():
        out = eager(ids, output_attentions=True)
        with probe.recording(model) as rec:  # the sdpa model's core queries/keys, the probe's formula
            sdpa = model(ids, use_cache=False).logits
    torch.testing.assert_close(out.logits, sdpa, rtol=0, atol=tolerance(sdpa))
    att = out.attentions
    assert len(att) == NUM_CALLS and att[0].shape == (1, CONFIG["num_attention_heads"], 11, 11)
    for a in att:
        torch.testing.assert_close(a.sum(-1), torch.ones_like(a[..., 0]))
        assert not a.triu(1).any()  # causal
    core = att[CONFIG["num_prelude_layers"] : -CONFIG["num_coda_layers"]]  # iteration-major, then layer
    for t, (g, w) in enumerate(zip(CONFIG["chunk_sizes"], CONFIG["chunk_offsets"])):
        real = -(-(11 + w) // g)  # latents that hold a real token
        for i in range(CONFIG["num_core_layers"]):
            q, k = rec["calls"][i][t]
            want = probe.attention_probs(q, k)[:, :, :real, :real]
            torch.testing.assert_close(core[t * CONFIG["num_core_layers"] + i], want, rtol=0, atol=1e-5)


def test_generate_returns_each_steps_attention_weights(eager):
    ids = torch.stack(prompts([6], seed=4))
    out = eager.generate(ids, max_new_tokens=3, output_attentions=True, return_dict_in_generate=True, **GEN)
    with torch.no_grad():
        full = eager(out.sequences, use_cache=False, output_attentions=True).attentions
    for k, step in enumerate(out.attentions[1:], start=ids.shape[1]):  # token k against keys 0..k
        assert len(step) == NUM_CALLS
        torch.testing.assert_close(step[0][:, :, 0], full[0][:, :, k, : k + 1], rtol=0, atol=1e-5)
        torch.testing.assert_close(step[-1][:, :, 0], full[-1][:, :, k, : k + 1], rtol=0, atol=1e-5)


def test_several_tokens_after_a_filled_cache_return_the_full_forwards_attention_weights(eager):
    """n new tokens after c cached ones in one call (a prefill in pieces, assisted decoding):
    their rows of the full uncached forward's weights; the core of a level, the rows of the
    latents whose chunks they close (None where they close none)."""
    from spiral_megatron.functional_spiral import closed_chunks

    levels = ([None] * CONFIG["num_prelude_layers"]
              + [t for t in range(len(CONFIG["chunk_sizes"])) for _ in range(CONFIG["num_core_layers"])]
              + [None] * CONFIG["num_coda_layers"])
    for c, n in ((5, 7), (8, 3), (3, 1)):
        ids = torch.stack(prompts([c + n, c + n], seed=c))
        with torch.no_grad():
            full = eager(ids, use_cache=False, output_attentions=True).attentions
            cache = eager(ids[:, :c], use_cache=True).cache
            got = eager(ids[:, c:], cache=cache, output_attentions=True).attentions
        assert len(got) == len(full) == NUM_CALLS
        for a, want, t in zip(got, full, levels):
            if t is None:
                torch.testing.assert_close(a, want[:, :, c:, :], rtol=0, atol=1e-5)
                continue
            g, w = CONFIG["chunk_sizes"][t], CONFIG["chunk_offsets"][t]
            first, last = closed_chunks(c, g, w), closed_chunks(c + n, g, w)
            if first == last:
                assert a is None, f"level {t}: no chunk closed, but weights"
            else:
                torch.testing.assert_close(a, want[:, :, first:last, :last], rtol=0, atol=1e-5)
    # assisted decoding would split every entry per new token, the core's latent ones too: refused
    with pytest.raises(ValueError, match="output_attentions is not supported with assisted decoding"):
        eager.generate(torch.cat([ids, ids], 1), max_new_tokens=4, prompt_lookup_num_tokens=3,
                       output_attentions=True, return_dict_in_generate=True, **GEN)


def test_loss_of_a_left_padded_batch_is_that_of_its_rows(model):
    """Each row's first real token is predicted by nothing, as when the row runs alone; the batch
    loss is the token-weighted mean of the rows' losses, or their sum / num_items_in_batch."""
    rows = prompts([9, 4, 7], seed=5)
    ids, mask = left_pad(rows)
    labels = ids.masked_fill(mask == 0, -100)
    sums, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            logits = model(row[None], use_cache=False).logits[0, :-1]
            sums += torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum")
            count += len(row) - 1
        loss = model(ids, attention_mask=mask, labels=labels).loss
        torch.testing.assert_close(loss, sums / count)
        summed = model(ids, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(40)).loss
        torch.testing.assert_close(summed, sums / 40)


def test_return_dict_position_ids_inputs_embeds_and_logits_to_keep(model):
    ids = torch.stack(prompts([7, 7], seed=6))
    with torch.no_grad():
        out = model(ids, labels=ids)
        loss, logits, cache = model(ids, labels=ids, return_dict=False)
        assert torch.equal(loss, out.loss) and torch.equal(logits, out.logits) and cache.get_seq_length() == 7
        embeds = model(inputs_embeds=model.get_input_embeddings()(ids)).logits
        assert torch.equal(embeds, out.logits)
        assert torch.equal(model(ids, logits_to_keep=2).logits, out.logits[:, -2:])
        positions = torch.arange(7)[None]  # what generate derives from the mask: accepted
        assert torch.equal(model(ids, position_ids=positions).logits, out.logits)
        with pytest.raises(ValueError, match="position_ids"):
            model(ids, position_ids=positions + 3)  # positions the model does not take


def test_automodel_is_the_base_model_with_the_folders_weights(folder, model):
    """AutoModel (feature extraction, reward heads, sentence embeddings) loads the folder's base
    model: every weight from the file, none new. Reference: the causal LM's last hidden state,
    which times the folder's output layer is its logits; a left-padded batch, the cache and the
    past_key_values name as the causal LM takes them."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    base, info = AutoModel.from_pretrained(str(folder), trust_remote_code=True, dtype=torch.float32,
                                           output_loading_info=True)
    assert type(base).__name__ == "SpiralModel" and not any(info.values()), info
    ids, mask = left_pad(prompts([8, 5], seed=4))
    with torch.no_grad():
        out = base.eval()(ids, attention_mask=mask, use_cache=True, output_hidden_states=True)
        full = model(ids, attention_mask=mask, output_hidden_states=True)
        assert torch.equal(out.last_hidden_state, full.hidden_states[-1])
        assert len(out.hidden_states) == len(full.hidden_states) == NUM_HIDDEN
        head = load_file(str(folder / "model.safetensors"))["lm_head.weight"]
        torch.testing.assert_close(out.last_hidden_state @ head.T, full.logits, rtol=0, atol=1e-5)
        nxt = torch.tensor([[3], [5]])
        step = base(nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1), cache=out.cache).last_hidden_state
        again = base(torch.cat([ids, nxt], 1), attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1), use_cache=False)
        torch.testing.assert_close(step[:, -1], again.last_hidden_state[:, -1], rtol=0, atol=tolerance(again[0]))
        assert base(ids, return_dict=False)[0].shape == (2, 8, CONFIG["hidden_size"])
