"""Load a converted SpiralFormer and generate from prompts (offline, CPU or GPU).

    python tools/convert_to_hf.py --load checkpoints/debug --out hf/debug --verify
    python examples/generate.py --model hf/debug --prompt "Once upon a time" --max-new-tokens 40
    python examples/generate.py --model hf/debug --prompt "The loop" "Each iteration" --num-beams 4
    python examples/generate.py --model hf/debug --prompt "The" --do-sample --temperature 0.8 --top-p 0.9 \
        --num-return-sequences 3
    python examples/generate.py --model hf/debug --prompt "def f(x):" --stop-strings "return" ")"
    python examples/generate.py --model hf/debug --prompt "The loop" --dtype bf16

Several prompts run as one left-padded batch (the folder's tokenizer pads on the left). The
options are transformers' `generate` arguments of the same names; greedy decoding by default.
"""

import argparse
import os
import sys
import time

DTYPES = {"auto": "auto", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # --dtype: torch's names


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="folder written by tools/convert_to_hf.py")
    p.add_argument("--prompt", nargs="+", default=["The"], help="one or more prompts (a batch)")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--do-sample", "--sample", action="store_true", help="sample instead of greedy/beam search")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest tokens (50 with --do-sample)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling")
    p.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams")
    p.add_argument("--num-return-sequences", type=int, default=1, help="sequences per prompt")
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--stop-strings", nargs="+", default=None, metavar="TEXT",
                   help="end a sequence once it generates one of these strings (transformers' stop_strings)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="auto",
                   help="the model's dtype (default: the folder's weights', as transformers loads them)")
    return p.parse_args(argv)


def load(folder: str, dtype: str = "auto"):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    chosen = DTYPES[dtype] if dtype == "auto" else getattr(torch, DTYPES[dtype])
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=chosen).eval()
    return tokenizer, model.to("cuda" if torch.cuda.is_available() else "cpu")


def generation_kwargs(args) -> dict:
    """`generate`'s arguments from the command line (those not given keep transformers' defaults)."""
    chosen = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, num_beams=args.num_beams,
                  num_return_sequences=args.num_return_sequences, use_cache=not args.no_cache,
                  temperature=args.temperature, top_k=args.top_k if args.top_k is not None or not args.do_sample
                  else 50, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                  stop_strings=args.stop_strings)
    return {k: v for k, v in chosen.items() if v is not None}


def generate(tokenizer, model, prompts, **kwargs) -> list:
    """The continuations of `prompts` (num_return_sequences each, in order), without the prompts."""
    import torch

    batch = tokenizer(list(prompts), return_tensors="pt", padding=True).to(model.device)
    if kwargs.get("stop_strings"):
        kwargs = dict(kwargs, tokenizer=tokenizer)  # StopStringCriteria reads the tokens' strings
    with torch.no_grad():
        out = model.generate(**batch, pad_token_id=tokenizer.pad_token_id, **kwargs)
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def main(argv=None) -> int:
    from spiral_megatron.extras import require

    require("generate.py", "hf")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    import torch

    torch.manual_seed(args.seed)
    tokenizer, model = load(args.model, args.dtype)
    start = time.perf_counter()
    try:
        texts = generate(tokenizer, model, args.prompt, **generation_kwargs(args))
    except ValueError as e:  # transformers' refusal of a combination, e.g. more sequences than beams
        print(f"generate.py: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    per = args.num_return_sequences
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"=== prompt {i // per + 1}" + (f", sequence {i % per + 1}" if per > 1 else ""))
        print(args.prompt[i // per] + text)
    print(f"[{len(texts)} sequence{'s' if len(texts) > 1 else ''} of up to {args.max_new_tokens} new tokens "
          f"in {elapsed:.2f}s, {'no ' if args.no_cache else ''}cache, {str(model.dtype).replace('torch.', '')}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
