"""Fine-tuning the converted model with transformers' Trainer and peft, against references:
gradient accumulation 2 against 1 (and the first loss against plain cross-entropy), gradient
checkpointing against none, bf16 autocast and bf16/fp16 weights against fp32 at the format's
tolerance, LoRA "all-linear" training every adapter it creates; the folder's tokenizer loading
as a standard one. Weights of std 0.1 here: the folder's std 0.3 makes a chaotic network whose
bf16 gradients are off by their own size (fp16: 13%), which no rounding tolerance covers.
Trainer(fp16=True) on a CPU runs float32 (accelerate autocasts fp16 on GPUs only): fp16 is
checked as fp16 weights, and as torch's fp16 autocast in one step."""

import builtins
import warnings

import pytest
import torch

from tests.gpu.compare import relative_error, tolerance
from tests.hf.conftest import CONFIG, load, randomize

DEPTH = CONFIG["num_prelude_layers"] + CONFIG["num_core_layers"] * len(CONFIG["chunk_sizes"]) + CONFIG["num_coda_layers"]
STEPS, BATCH = 2, 4


def rows():
    """8 rows of 12 tokens; row r leaves its first 2 (r % 4) labels out, so micro-batches hold
    different numbers of scored tokens (what makes accumulation need num_items_in_batch)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for r in range(STEPS * BATCH):
        ids = torch.randint(1, CONFIG["vocab_size"], (12,), generator=g)
        labels = ids.clone()
        labels[: 2 * (r % 4)] = -100
        out.append(dict(input_ids=ids, labels=labels))
    return out


def train(model, tmp_path, batch: int = BATCH, **args):
    """STEPS SGD steps; (logged losses, grad norms, the trained model)."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(**{**dict(
        output_dir=str(tmp_path), per_device_train_batch_size=batch, max_steps=STEPS, optim="sgd", learning_rate=0.05,
        lr_scheduler_type="constant", logging_steps=1, train_sampling_strategy="sequential", use_cpu=True,
        report_to=[], save_strategy="no", seed=0), **args})
    trainer = Trainer(model=model.train(), args=args, train_dataset=rows())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return torch.tensor([h["loss"] for h in logs]), torch.tensor([h["grad_norm"] for h in logs]), model


def fresh(folder):
    """The folder's model with weights of std 0.1 (module docstring)."""
    return randomize(load(folder), seed=2, std=0.1)


@pytest.fixture(scope="module")
def fp32_run(folder, tmp_path_factory):
    return train(fresh(folder), tmp_path_factory.mktemp("fp32"))


def params(model):
    return {k: v.detach().float() for k, v in model.named_parameters()}


def assert_same_run(run, reference, what: str, rtol: float, atol: float) -> None:
    """Two Trainer runs (losses, grad norms, trained model) agree: losses and norms to rtol,
    every weight to atol; prints the differences."""
    (losses, norms, model), (ref_losses, ref_norms, ref_model) = run, reference
    ref = params(ref_model)
    weights = max((p - ref[n]).abs().max().item() for n, p in params(model).items())
    print(f"\n{what}: losses {losses.tolist()} vs {ref_losses.tolist()}, grad norms {norms.tolist()} vs "
          f"{ref_norms.tolist()}, max |weights difference| {weights:.1e}")
    torch.testing.assert_close(losses, ref_losses, rtol=rtol, atol=0)
    torch.testing.assert_close(norms, ref_norms, rtol=rtol, atol=0)
    for name, p in params(model).items():
        torch.testing.assert_close(p, ref[name], rtol=0, atol=atol, msg=name)


def test_gradient_accumulation_matches_one_batch_and_plain_cross_entropy(folder, fp32_run, tmp_path):
    batch = rows()[:BATCH]
    ids, labels = torch.stack([r["input_ids"] for r in batch]), torch.stack([r["labels"] for r in batch])
    with torch.no_grad():
        logits = fresh(folder)(ids, use_cache=False).logits[:, :-1]
    first = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(fp32_run[0][0], first, rtol=1e-5, atol=0)
    accumulated = train(fresh(folder), tmp_path, batch=BATCH // 2, gradient_accumulation_steps=2)
    assert_same_run(accumulated, fp32_run, f"accumulation 2 vs 1 (first loss by hand {first:.6f})", 1e-5, 1e-6)


def test_gradient_checkpointing_recomputes_and_changes_nothing(folder, fp32_run, tmp_path):
    ckpt = fresh(folder)
    calls = []
    ckpt.model.prelude.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))
    run = train(ckpt, tmp_path, gradient_checkpointing=True)
    assert len(calls) == 2 * STEPS, f"attention ran {len(calls)} times in {STEPS} steps: no recompute"
    assert_same_run(run, fp32_run, "checkpointing vs not", 1e-6, 1e-7)

    ids = torch.stack([r["input_ids"] for r in rows()[:BATCH]])  # the switch itself, loss and gradients
    grads = []
    for enable in (False, True):
        m = fresh(folder).train()
        if enable:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # renamed activation_checkpointing_enable in 5.25
                m.gradient_checkpointing_enable()
        m(ids, labels=ids).loss.backward()
        grads.append({k: p.grad for k, p in m.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=1e-7, msg=name)


@pytest.mark.parametrize("fmt", ["bf16", "bf16-weights", "fp16-weights"])
def test_trainer_in_low_precision_is_fp32_within_the_formats_tolerance(folder, fp32_run, tmp_path, fmt):
    dtype = torch.float16 if fmt.startswith("fp16") else torch.bfloat16
    model = fresh(folder)
    if fmt.endswith("-weights"):
        model = model.to(dtype)
    seen = []
    model.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    losses, norms, trained = train(model, tmp_path, **({} if fmt.endswith("-weights") else {fmt: True}))
    assert set(seen) == {dtype}, f"the model ran in {set(seen)}, not {dtype}"
    tol = tolerance(("fp32", fmt[:4]), depth=DEPTH, passes=2)
    print(f"\nTrainer {fmt} vs fp32: losses {losses.tolist()} vs {fp32_run[0].tolist()}, relative error loss "
          f"{relative_error(losses, fp32_run[0]):.1e}, grad norm {relative_error(norms, fp32_run[1]):.1e} (tolerance {tol:.1e})")
    assert relative_error(losses, fp32_run[0]) <= tol, (losses, fp32_run[0], tol)
    assert relative_error(norms, fp32_run[1]) <= tol, (norms, fp32_run[1], tol)
    assert all(torch.isfinite(p).all() for p in trained.parameters())


def test_fp16_autocast_step_is_fp32_within_the_formats_tolerance(folder):
    ids = torch.stack([r["input_ids"] for r in rows()[:BATCH]])
    runs = []
    for dtype in (None, torch.float16):
        model = fresh(folder).train()
        with torch.autocast("cpu", dtype=torch.float16, enabled=dtype is not None):
            out = model(ids, labels=ids)
        assert out.logits.dtype == (dtype or torch.float32)
        out.loss.backward()
        runs.append((out.loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    tol = tolerance(("fp32", "fp16"), depth=DEPTH, passes=2)
    print(f"\nfp16 autocast vs fp32, one step: relative error loss {relative_error(runs[1][0], runs[0][0]):.1e}, "
          f"gradients {relative_error(runs[1][1], runs[0][1]):.1e} (tolerance {tol:.1e})")
    assert relative_error(runs[1][0], runs[0][0]) <= tol and relative_error(runs[1][1], runs[0][1]) <= tol


def test_lora_all_linear_trains_every_adapter(folder, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(fresh(folder), LoraConfig(r=4, target_modules="all-linear"))
    routers = [n for n, _ in model.named_parameters() if "mesh_" in n and "lora_B" in n]
    assert routers, "no adapter on the MeSH routers: the test checks nothing"
    train(model, tmp_path, learning_rate=0.5)
    frozen = [n for n, p in model.named_parameters() if "lora_B" in n and not p.detach().any()]
    assert not frozen, f"adapters that never got a gradient: {frozen}"
    ids = torch.stack([r["input_ids"] for r in rows()[:2]])
    with torch.no_grad():
        adapted = model.eval()(ids, use_cache=False).logits
        merged = model.merge_and_unload()(ids, use_cache=False).logits
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-4)


def test_the_tokenizer_loads_as_a_standard_one_without_questions_or_warnings(folder, monkeypatch, caplog):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    asked = []
    monkeypatch.setattr(builtins, "input", lambda *a: asked.append(a) or "n")  # answering "no" if asked
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok = PreTrainedTokenizerFast.from_pretrained(str(folder))
        auto = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
    assert not asked and not [r for r in caplog.records if r.levelname == "WARNING"]
    assert type(auto).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend")
    assert auto("w1 w2").input_ids == tok("w1 w2").input_ids and auto.padding_side == "left"
    assert set(tok("w1 w2")) == {"input_ids", "attention_mask"}  # nothing the model refuses
