"""lm-evaluation-harness on a converted HF folder, offline, with local tasks over JSONL files:
a loglikelihood (multiple-choice) task and a generate_until task, each checked against the HF
model computed by hand, one prompt at a time. Batches of 2 exercise lm-eval's padding: right
padding for loglikelihood, left padding (with an attention mask) for generation. The YAML is
the one docs/RESEARCH.md documents."""

import json

import pytest
import torch

pytestmark = pytest.mark.checkpoint  # saves or loads a checkpoint

lm_eval = pytest.importorskip("lm_eval")

MC_YAML = """task: spiral_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
GEN_YAML = """task: spiral_local_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    mc = [{"question": "w1 w2 w3 w4", "choices": ["w5", "w6 w7", "w8"], "answer": 1},
          {"question": "w9 w10", "choices": ["w11", "w12"], "answer": 0}]
    gen = [{"prompt": "w3 w1 w4 w1 w5", "target": "w9"}, {"prompt": "w2 w6", "target": "w5"}]
    for name, rows, yaml in (("mc", mc, MC_YAML), ("gen", gen, GEN_YAML)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / f"{name}.yaml").write_text(yaml.format(path=folder / f"{name}.jsonl"))
    return folder, mc, gen


def _loglikelihood(model, tok, context: str, continuation: str) -> float:
    """sum log p(continuation tokens | context), as lm-eval scores a choice."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    ids = tok(context + continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]), use_cache=False).logits[0].float(), -1)
    return sum(logp[i - 1, ids[i]].item() for i in range(len(ctx), len(ids)))


def _greedy(model, tok, prompt: str, n: int) -> str:
    """n greedy tokens by full forwards (no cache, no generate())."""
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    start = len(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    return tok.decode(ids[start:])


def test_local_tasks_loglikelihood_and_generation(hf_folder, tasks):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    from spiral_megatron.conversion.convert import load_hf

    folder, mc, gen = tasks
    lm = HFLM(pretrained=str(hf_folder), trust_remote_code=True, device="cpu", dtype="float32", batch_size=2)
    out = simple_evaluate(model=lm, tasks=["spiral_local_mc", "spiral_local_gen"],
                          task_manager=TaskManager(include_path=str(folder)), log_samples=True,
                          bootstrap_iters=0)
    assert 0.0 <= out["results"]["spiral_local_mc"]["acc,none"] <= 1.0
    assert "exact_match,none" in out["results"]["spiral_local_gen"]

    model, tok = load_hf(hf_folder), AutoTokenizer.from_pretrained(str(hf_folder))
    for sample in out["samples"]["spiral_local_mc"]:
        doc = sample["doc"]
        got = [resp[0][0] for resp in sample["resps"]]  # one (loglikelihood, is_greedy) per choice
        want = [_loglikelihood(model, tok, doc["question"], " " + c) for c in doc["choices"]]
        assert got == pytest.approx(want, abs=1e-4)
    for sample in out["samples"]["spiral_local_gen"]:
        assert sample["resps"][0][0] == _greedy(model, tok, sample["doc"]["prompt"], 4)
