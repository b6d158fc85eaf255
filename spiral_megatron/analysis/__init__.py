"""Research tools over trained SpiralFormers: evaluation, the paper's probes, ablation planning.

`data`       token sequences from an indexed dataset or text/JSONL files (fixed, seed-free)
`models`     an HF SpiralFormer from a converted folder or from a Megatron checkpoint (any layout)
`evaluate`   perplexity over those sequences
`probe`      per-iteration attention statistics and MeSH's state diagnostics (pure torch)
`ablation`   the ablation variants, their FLOPs matching, and the result table (pure Python)

The command-line wrappers are tools/evaluate.py, tools/probe.py and tools/ablate.py.
"""
