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
