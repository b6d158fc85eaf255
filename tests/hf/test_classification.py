"""AutoModelForSequenceClassification on a converted folder (classifiers, reward models): the
base model's weights from the file, a new `score`, the score read at each row's last real token.
References: each row alone and unpadded through the causal LM (its last hidden state times
`score`), and torch's own losses."""

import pytest
import torch

from tests.hf.conftest import CONFIG
from tests.hf.test_generate import left_pad, prompts


def classifier(folder, **kwargs):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(str(folder), trust_remote_code=True, dtype=torch.float32,
                                                              output_loading_info=True, **kwargs)


def right_pad(rows):
    ids, mask = left_pad(rows)
    for r, row in enumerate(rows):  # the same rows, padding moved to the end
        ids[r], mask[r] = ids[r].roll(-(ids.shape[1] - len(row))), mask[r].roll(-(ids.shape[1] - len(row)))
    return ids, mask


@pytest.mark.parametrize("padding", ["left", "right"])
def test_the_score_is_read_at_each_rows_last_real_token(folder, model, padding):
    clf, info = classifier(folder, num_labels=3)
    assert type(clf).__name__ == "SpiralForSequenceClassification"
    assert info["missing_keys"] == {"score.weight"} and not info["unexpected_keys"] - {"lm_head.weight"}, info
    rows = prompts([7, 3, 5], seed=2)
    ids, mask = (left_pad if padding == "left" else right_pad)(rows)
    with torch.no_grad():
        logits = clf.eval()(ids, attention_mask=mask).logits  # [3, 3]
        alone = torch.cat([model(row[None], output_hidden_states=True).hidden_states[-1][:, -1] for row in rows])
    assert logits.shape == (3, 3)
    torch.testing.assert_close(logits, alone @ clf.score.weight.T, rtol=0, atol=1e-5)


def test_losses_are_torchs_for_the_problem_type(folder):
    ids, mask = left_pad(prompts([6, 4], seed=5))
    clf, _ = classifier(folder, num_labels=3)
    out = clf(ids, attention_mask=mask, labels=torch.tensor([2, 0]))
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, torch.tensor([2, 0])))
    out.loss.backward()
    assert clf.score.weight.grad is not None and clf.model.embed_tokens.weight.grad is not None
    reward, _ = classifier(folder, num_labels=1)  # a reward model: regression on one score
    out = reward(ids, attention_mask=mask, labels=torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(out.loss, torch.nn.functional.mse_loss(out.logits.squeeze(-1), torch.tensor([0.5, -1.0])))
    assert out.cache is None and out.logits.shape == (2, 1)
    with pytest.raises(ValueError, match="no real token"):
        clf(ids, attention_mask=torch.cat([mask[:1], torch.zeros_like(mask[:1])]))
    assert CONFIG["hidden_size"] == clf.score.in_features


def test_token_classification_scores_each_tokens_hidden_state(folder, model):
    """AutoModelForTokenClassification: every token's final hidden state times `score` (with its
    bias), each left-padded row as alone, the padding's hidden state zero (only the bias); the
    loss is torch's cross-entropy over the labelled tokens; dropout only in training mode."""
    from transformers import AutoConfig, AutoModelForTokenClassification

    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=True, num_labels=4)
    config.classifier_dropout = 0.5  # read as transformers' generic head reads it
    clf, info = AutoModelForTokenClassification.from_pretrained(
        str(folder), config=config, trust_remote_code=True, dtype=torch.float32, output_loading_info=True)
    assert type(clf).__name__ == "SpiralForTokenClassification"
    assert info["missing_keys"] == {"score.weight", "score.bias"} and not info["unexpected_keys"] - {"lm_head.weight"}
    rows = prompts([7, 3, 5], seed=7)
    ids, mask = left_pad(rows)
    labels = torch.randint(0, 4, ids.shape, generator=torch.Generator().manual_seed(1)).masked_fill(mask == 0, -100)
    clf.eval()
    with torch.no_grad():
        out = clf(ids, attention_mask=mask, labels=labels)
        assert out.logits.shape == (3, ids.shape[1], 4)
        for r, row in enumerate(rows):
            h = model(row[None], output_hidden_states=True).hidden_states[-1][0]  # [n_r, d]
            pad = ids.shape[1] - len(row)
            torch.testing.assert_close(out.logits[r, pad:], h @ clf.score.weight.T + clf.score.bias, rtol=0, atol=1e-5)
            torch.testing.assert_close(out.logits[r, :pad], clf.score.bias.expand(pad, 4), rtol=0, atol=0)
    want = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 4), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, want)
    clf.train()
    torch.manual_seed(0)
    assert not torch.allclose(clf(ids, attention_mask=mask).logits, out.logits)  # dropout 0.5 before the score


def test_question_answering_gives_each_token_a_start_and_an_end_logit(folder, model):
    """AutoModelForQuestionAnswering: qa_outputs on every token's final hidden state (each
    left-padded row as alone); the loss is the mean of torch's cross-entropies of the start and
    the end positions."""
    from transformers import AutoModelForQuestionAnswering

    qa, info = AutoModelForQuestionAnswering.from_pretrained(str(folder), trust_remote_code=True, dtype=torch.float32,
                                                             output_loading_info=True)
    assert type(qa).__name__ == "SpiralForQuestionAnswering"
    assert info["missing_keys"] == {"qa_outputs.weight", "qa_outputs.bias"}
    rows = prompts([8, 6], seed=8)
    ids, mask = left_pad(rows)
    starts, ends = torch.tensor([3, 5]), torch.tensor([6, 7])
    out = qa.eval()(ids, attention_mask=mask, start_positions=starts, end_positions=ends)
    with torch.no_grad():
        for r, row in enumerate(rows):
            h = model(row[None], output_hidden_states=True).hidden_states[-1][0]
            both = h @ qa.qa_outputs.weight.T + qa.qa_outputs.bias  # [n_r, 2]
            pad = ids.shape[1] - len(row)
            torch.testing.assert_close(out.start_logits[r, pad:], both[:, 0], rtol=0, atol=1e-5)
            torch.testing.assert_close(out.end_logits[r, pad:], both[:, 1], rtol=0, atol=1e-5)
    ce = torch.nn.functional.cross_entropy
    torch.testing.assert_close(out.loss, (ce(out.start_logits, starts) + ce(out.end_logits, ends)) / 2)
    out.loss.backward()
    assert qa.qa_outputs.weight.grad is not None and qa.model.embed_tokens.weight.grad is not None
