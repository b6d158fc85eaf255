"""Rerunnable ablations: train the paper's variants on the same data, tabulate, plot.

    python tools/ablate.py --out runs/ablate-debug --flavor debug --train-iters 150 --seeds 1,2
        [--variants spiral-c2f,looped,gpt] [--lrs 1e-3,3e-3] [--nproc 1]

Every variant (spiral_megatron.analysis.ablation.variants) is the base flavor plus SpiralConfig
overrides, trained by examples/pretrain_spiral.py as a subprocess with the same data, batch,
steps and schedule. Validation is done here, after training, on the same held-out documents
for every variant, seed and learning rate (never on the job's seed-dependent split): the
final checkpoint is scored with spiral_megatron.analysis.evaluate.

Data: by default the bundled corpus, every 10th document held out [ours]: OUT/data holds the
train indexed dataset, valid.jsonl and the tokenizer. Or give --train-data PREFIX
--valid-data FILES --tokenizer DIR (--json-keys KEY: the text key of JSONL files). Relative paths are
the caller's: the training runs start in the folder ablate.py was started in.

Runs go seed by seed (every variant at the first seed, then the next seed). Resumable: a run whose OUT/runs/<variant>/lr<lr>-seed<seed>/result.json exists is not rerun
(an unfinished one restarts from scratch). At the end OUT/table.md, OUT/results.json and
OUT/val_loss_vs_flops.png are written from every finished run.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = ROOT / "examples" / "pretrain_spiral.py"
VALID_EVERY = 10  # every 10th bundled document is held out [ours]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (runs, data, table, plot)")
    p.add_argument("--flavor", default="debug", help="base flavor (a looped one)")
    p.add_argument("--variants", default=None, help="comma-separated variant names (default: all)")
    p.add_argument("--seeds", default="1,2", help="comma-separated seeds")
    p.add_argument("--lrs", default="3e-3", help="comma-separated peak learning rates (a small grid)")
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--global-batch-size", type=int, default=16)
    p.add_argument("--train-iters", type=int, default=150)
    p.add_argument("--warmup-iters", type=int, default=None, help="default: 10%% of train iters")
    p.add_argument("--nproc", type=int, default=1, help="processes per training run (data parallel)")
    p.add_argument("--train-data", default=None, help="indexed dataset prefix to train on")
    p.add_argument("--valid-data", nargs="*", default=None, help="held-out .jsonl/.txt files or indexed prefixes")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder of --train-data")
    p.add_argument("--json-keys", "--json-key", "--text-key", dest="text_key", default="text", metavar="KEY",
                   help="JSONL key holding --valid-data's text (as tools/preprocess_data.py takes it)")
    p.add_argument("--valid-sequences", type=int, default=None, help="cap on validation sequences")
    p.add_argument("--train-arg", action="append", default=[],
                   help="extra argument passed to the training job (repeatable), e.g. --train-arg=--weight-decay=0.0")
    p.add_argument("--list", action="store_true", help="print the variants and their FLOPs, train nothing")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per training run")
    return p.parse_args(argv)


def bundled_data(out: Path) -> tuple:
    """(train prefix, [valid.jsonl], tokenizer dir) from the bundled corpus, made once."""
    from spiral_megatron.job.data import corpus
    from spiral_megatron.job.data import default_data
    from spiral_megatron.job.data.preprocess import write_indexed_dataset
    from spiral_megatron.job.data.tokenizer import Tokenizer

    folder = out / "data"
    prefix, valid, tok_dir = folder / "train_text_document", folder / "valid.jsonl", folder / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        docs = corpus.documents()
        _, default_tok = default_data.ensure(str(out / "cache"), 512)
        tok = Tokenizer.load(default_tok)
        train = [d for i, d in enumerate(docs) if i % VALID_EVERY != VALID_EVERY - 1]
        held = [d for i, d in enumerate(docs) if i % VALID_EVERY == VALID_EVERY - 1]
        folder.mkdir(parents=True, exist_ok=True)
        write_indexed_dataset(train, tok, str(prefix))
        valid.write_text("".join(json.dumps({"text": d}) + "\n" for d in held))
        tok.save(tok_dir)  # last: marks the folder complete
    return str(prefix), [str(valid)], tok_dir


def train_command(args, flavor: str, variant, lr: float, seed: int, data: tuple, run_dir: Path) -> list:
    from spiral_megatron.analysis import ablation

    launch = [sys.executable]
    if args.nproc > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    warmup = args.warmup_iters if args.warmup_iters is not None else max(1, args.train_iters // 10)
    job = [
        *ablation.model_arguments(flavor, variant),
        f"--seq-length={args.seq_length}", f"--micro-batch-size={args.micro_batch_size}",
        f"--global-batch-size={args.global_batch_size}", f"--train-iters={args.train_iters}",
        f"--lr={lr}", f"--min-lr={lr / 10}", f"--lr-warmup-iters={warmup}", f"--seed={seed}",
        f"--train-data-path={data[0]}", f"--tokenizer={data[2]}",  # used whole; validation is done here
        "--eval-interval=none", f"--save={run_dir / 'ckpt'}", f"--log-json={run_dir / 'log.jsonl'}",
        "--log-interval=10", f"--cache-dir={Path(args.out) / 'cache'}",
    ]
    return launch + [str(TRAIN_SCRIPT), *job, *args.train_arg]


def score(run_dir: Path, valid_rows) -> dict:
    """Val loss of the run's final checkpoint on the fixed held-out rows (float32, on a GPU when
    there is one), plus what the table needs."""
    from spiral_megatron.analysis import evaluate, models

    model, _ = models.placed(models.load(str(run_dir / "ckpt")).model)
    return evaluate.perplexity(model, valid_rows, batch_size=16)


def run_one(args, flavor, variant, lr, seed, data, valid_rows, vocab_size) -> dict:
    """Train (unless finished) and score one run; returns its result record."""
    from spiral_megatron.config import flops
    from spiral_megatron.analysis import ablation
    from spiral_megatron.conversion import megatron_io

    vdir, rdir = ablation.run_name(variant.name, lr, seed)
    run_dir = Path(args.out) / "runs" / vdir / rdir
    done = run_dir / "result.json"
    if done.is_file():
        print(f"[ablate] {vdir}/{rdir}: finished earlier, not rerun", flush=True)
        return json.loads(done.read_text())
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an unfinished run restarts from scratch
    run_dir.mkdir(parents=True)
    cmd = train_command(args, flavor, variant, lr, seed, data, run_dir)
    (run_dir / "command.txt").write_text(" ".join(cmd) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"), PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    print(f"[ablate] {vdir}/{rdir}: training ({variant.about})", flush=True)
    started = time.time()
    with open(run_dir / "train.log", "w") as log:
        # in the caller's folder: --out, the data and --train-arg paths mean what the user meant
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=args.timeout).returncode
    wall = time.time() - started
    if rc != 0:
        tail = (run_dir / "train.log").read_text()[-3000:]
        raise RuntimeError(f"training {vdir}/{rdir} exited {rc}; see {run_dir / 'train.log'}:\n{tail}")
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    records = [r for r in records if "tokens_per_sec" in r]
    folder, _ = megatron_io.find_checkpoint(str(run_dir / "ckpt"))
    margs = megatron_io.read_model_args(folder)
    config = margs.spiral_config()
    ev = score(run_dir, valid_rows)
    tokens = args.train_iters * args.global_batch_size * args.seq_length
    result = dict(
        variant=variant.name, about=variant.about, lr=lr, seed=seed, val_loss=ev["loss"],
        val_tokens=ev["tokens"], unique_params=flops.unique_parameters(config, margs.vocab_size,
                                                                      margs.share_embeddings_and_output_weights),
        train_flops=flops.training_flops(config, args.seq_length, margs.vocab_size) * args.train_iters * args.global_batch_size,
        tokens=tokens, tokens_per_s=_mean_rate(records) or tokens / wall,
        final_train_loss=records[-1]["loss"] if records else None, wall_s=wall,
        topology=config.topology, chunk_sizes=list(config.chunk_sizes), overrides={k: ablation.cli_value(v) for k, v in variant.overrides.items()},
    )
    done.write_text(json.dumps(result, indent=2))
    print(f"[ablate] {vdir}/{rdir}: val loss {ev['loss']:.4f} ({wall:.0f} s)", flush=True)
    return result


def _mean_rate(records: list):
    """Mean logged tokens/s, leaving out the first log (start-up) when there are several."""
    rates = [r["tokens_per_sec"] for r in records][1:] or [r["tokens_per_sec"] for r in records]
    return sum(rates) / len(rates) if rates else None


def write_outputs(out: Path, results: list, title: str) -> None:
    from spiral_megatron.analysis import ablation

    rows = ablation.summarize(results)
    (out / "results.json").write_text(json.dumps({"runs": results, "rows": rows}, indent=2))
    (out / "table.md").write_text(ablation.markdown_table(rows))
    ablation.plot(rows, str(out / "val_loss_vs_flops.png"), title)
    print(ablation.markdown_table(rows))


def main(argv=None) -> int:
    """The command line; autograd is off inside, not for the caller (tests call this in-process)."""
    from spiral_megatron.extras import require

    require("ablate.py", "hf", "research")
    import torch

    with torch.no_grad():
        return _run(argv)


def _run(argv) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    from spiral_megatron.analysis import ablation, data as adata
    from spiral_megatron.job.data.tokenizer import Tokenizer
    from spiral_megatron.job.settings.resolve import padded_vocab

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # the tokenizer's vocabulary as the job pads it (for the FLOPs matching only); 512: the bundled one's
    vocab = padded_vocab(Tokenizer.load(args.tokenizer).vocab_size if args.tokenizer else 512)
    try:
        chosen = ablation.select(ablation.variants(args.flavor, args.seq_length, vocab),
                                 args.variants.split(",") if args.variants else None)
        seeds = [int(s) for s in args.seeds.split(",")]
        lrs = [float(x) for x in args.lrs.split(",")]
    except ValueError as e:
        print(f"ablate: error: {e}", file=sys.stderr)
        return 2
    if args.list:
        for v in chosen:
            f = ablation.train_flops_per_sequence(args.flavor, v.overrides, args.seq_length, vocab)
            print(f"{v.name:14s} {f / 1e9:9.3f} GFLOP/seq (train)  {v.about}")
        return 0
    if args.train_data:
        if not (args.valid_data and args.tokenizer):
            print("ablate: error: --train-data needs --valid-data and --tokenizer", file=sys.stderr)
            return 2
        data = (args.train_data, args.valid_data, Path(args.tokenizer))
    else:
        data = bundled_data(out)
    tok = Tokenizer.load(data[2])
    try:
        valid_rows = adata.sequences(adata.token_documents(data[1], tok, args.text_key), args.seq_length,
                                     args.valid_sequences)
    except (FileNotFoundError, ValueError) as e:
        print(f"ablate: error: --valid-data: {e}", file=sys.stderr)
        return 2
    print(f"[ablate] {len(chosen)} variants x {len(lrs)} lr x {len(seeds)} seeds; validation: "
          f"{valid_rows.shape[0]} sequences of {args.seq_length} tokens from {data[1]}", flush=True)
    results = []
    for seed in seeds:  # seed-major: an interrupted sweep still covers every variant once
        for variant in chosen:
            for lr in lrs:
                results.append(run_one(args, args.flavor, variant, lr, seed, data, valid_rows, vocab))
                write_outputs(out, results, f"{args.flavor}: {args.train_iters} steps x "
                              f"{args.global_batch_size * args.seq_length} tokens")
    return 0


if __name__ == "__main__":
    from spiral_megatron.job.run.console import quiet_tool

    with quiet_tool("ablate"):  # Megatron's known-harmless warnings counted in one line
        sys.exit(main())
