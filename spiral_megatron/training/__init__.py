"""The training job behind `examples/pretrain_spiral.py`, on `megatron.core` only.

One concept per module: `config` (YAML + command line, validated before any compute),
`tokenizer` and `corpus` (the embedded default data), `preprocess` (text -> indexed dataset),
`data` (Megatron datasets and the batch order), `setup` (model, DDP, optimizer, scheduler),
`step` (one training step, evaluation), `checkpointing`, `metrics` (logs), `loop`.
"""
