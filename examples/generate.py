"""Load a converted SpiralFormer and generate from a prompt (offline, CPU or GPU).

    python tools/convert_to_hf.py --load checkpoints/debug --out hf/debug --verify
    python examples/generate.py --model hf/debug --prompt "Once upon a time" --max-new-tokens 40
"""

import argparse
import os
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="folder written by tools/convert_to_hf.py")
    p.add_argument("--prompt", default="The")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--sample", action="store_true", help="sample (top-k 50) instead of greedy")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def load(folder: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    return tokenizer, model.to("cuda" if torch.cuda.is_available() else "cpu")


def generate(tokenizer, model, prompt: str, max_new_tokens: int, sample: bool, use_cache: bool) -> str:
    import torch

    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(model.device)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=sample, top_k=50 if sample else None,
                             use_cache=use_cache, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :])


def main():
    from spiral_megatron.extras import require

    require("generate.py", "hf")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args()
    import torch

    torch.manual_seed(args.seed)
    tokenizer, model = load(args.model)
    start = time.perf_counter()
    text = generate(tokenizer, model, args.prompt, args.max_new_tokens, args.sample, not args.no_cache)
    elapsed = time.perf_counter() - start
    print(args.prompt + text)
    print(f"[{args.max_new_tokens} tokens in {elapsed:.2f}s, {'no ' if args.no_cache else ''}cache]")


if __name__ == "__main__":
    main()
