"""Decoding speed of a converted Hugging Face folder: batches, the cache and passes of several tokens.

Prints the median wall time of each way `transformers` users decode, on prompts cut from a text
file (default: this repository's README.md), and checks each batched result against the
prompts one at a time (how many rows' tokens are the same; in fp32, all):

    left-padded batch   `generate` of --new tokens for --batch prompts of different lengths:
                        greedy with the cache, without it, and beam search (4 beams)
    one prompt          greedy with the cache, and prompt-lookup decoding (10 tokens a guess)
    after a cache       the rest of a long prompt after a cache of its first quarter, and the
                        whole prompt fed in 6 pieces

    python benchmarks/hf_decode.py --model hf/mine [--batch 8] [--new 32] [--rounds 3]

CPU by default (--device cuda for a GPU); float32 unless --dtype bf16 or fp16.
"""

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
README = Path(__file__).resolve().parent.parent / "README.md"


def timed(fn, rounds: int):
    """(median milliseconds, the last result) of `rounds` calls after one unmeasured call."""
    out = fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000, out


def report(what: str, ms: float, check: str = "") -> None:
    print(f"  {what:<44} {ms:9.1f} ms   {check}".rstrip())


def prompts_from(text: str, tokenizer, batch: int, longest: int):
    """`batch` prompts of different token lengths (from a quarter of `longest` up to it), cut
    from consecutive stretches of `text`."""
    ids = tokenizer(text, verbose=False).input_ids  # one long stretch, cut below: no length warning
    lengths = [max(1, longest * (k + 1) // batch) for k in range(batch)]
    need = sum(lengths)
    if len(ids) < need:
        raise SystemExit(f"hf_decode: the text has {len(ids)} tokens, {need} are needed for {batch} prompts "
                         f"of up to {longest}: pass a longer --text or a smaller --batch/--prompt-length")
    starts = [sum(lengths[:k]) for k in range(batch)]
    return [ids[s : s + n] for s, n in zip(starts, lengths)]


def left_padded(rows, pad_id: int, device):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, width - len(row):] = torch.tensor(row)
        mask[r, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="converted Hugging Face folder")
    parser.add_argument("--text", default=str(README), help="text file the prompts are cut from")
    parser.add_argument("--batch", type=int, default=8, help="prompts in the left-padded batch")
    parser.add_argument("--prompt-length", type=int, default=64, help="tokens of the longest prompt")
    parser.add_argument("--new", type=int, default=32, help="tokens to generate")
    parser.add_argument("--rounds", type=int, default=3, help="timed calls per measure (median)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    args = parser.parse_args(argv)
    if not (Path(args.model) / "config.json").is_file():
        raise SystemExit(f"hf_decode: --model {args.model} is not a converted folder (no config.json): "
                         "make one with tools/convert_to_hf.py")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True, dtype=DTYPES[args.dtype])
    model = model.to(args.device).eval()
    limit = model.config.max_position_embeddings
    if args.prompt_length + args.new > limit:
        raise SystemExit(f"hf_decode: --prompt-length {args.prompt_length} + --new {args.new} is over the model's "
                         f"max_position_embeddings {limit}")
    rows = prompts_from(Path(args.text).read_text(), tokenizer, args.batch, args.prompt_length)
    ids, mask = left_padded(rows, model.generation_config.pad_token_id or 0, args.device)
    greedy = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False)
    print(f"{args.model}: {model.num_parameters():,} parameters, {args.dtype} on {args.device}; "
          f"{args.batch} prompts of {len(rows[0])}-{len(rows[-1])} tokens, {args.new} new tokens, "
          f"median of {args.rounds}")

    def alone(**kwargs):
        return [model.generate(torch.tensor([row], device=args.device), **greedy, **kwargs)[0, len(row):]
                for row in rows]

    with torch.no_grad():
        width = ids.shape[1]
        for name, kwargs in (("greedy, cached", {}), ("greedy, use_cache=False", {"use_cache": False}),
                             ("beam search, 4 beams", {"num_beams": 4})):
            ms, out = timed(lambda: model.generate(ids, attention_mask=mask, **greedy, **kwargs), args.rounds)
            same = sum(torch.equal(out[r, width:], one) for r, one in enumerate(alone(**kwargs)))
            report(f"left-padded batch, {name}", ms, f"rows = their prompt alone: {same} of {len(rows)}")

        one = ids[-1:]  # the longest prompt, no padding
        ms, reference = timed(lambda: model.generate(one, **greedy), args.rounds)
        report("one prompt, greedy, cached", ms)
        ms, out = timed(lambda: model.generate(one, prompt_lookup_num_tokens=10, **greedy), args.rounds)
        same = torch.equal(out, reference)
        report("one prompt, prompt-lookup decoding", ms, f"= greedy: {'yes' if same else 'no'}")

        quarter = max(1, width // 4)
        full = model(one, use_cache=False).logits
        prefix = model(one[:, :quarter], use_cache=True).cache
        ms, rest = timed(lambda: model(one[:, quarter:], cache=copy.deepcopy(prefix)).logits, args.rounds)
        difference = (rest.float() - full[:, quarter:].float()).abs().max().item()
        report(f"{width - quarter} tokens after a {quarter}-token cache", ms,
               f"max |logits - full forward's| {difference:.1e} (|logits| up to {full.abs().max().item():.1f})")

        cuts = [width * k // 6 for k in range(7)]

        def pieces():
            cache = None
            for a, b in zip(cuts, cuts[1:]):
                cache = model(one[:, a:b], cache=cache, use_cache=True).cache
            return cache

        ms, _ = timed(pieces, args.rounds)
        report(f"{width} tokens in 6 pieces", ms)
    if args.dtype != "fp32":
        print(f"  ({args.dtype}: a batch rounds differently from a prompt alone, so a near-tie between two next "
              "tokens can go either way; the fp32 run checks the tokens)")


if __name__ == "__main__":
    from spiral_megatron.job.run.console import quiet_tool

    with quiet_tool("hf_decode"):
        main()
