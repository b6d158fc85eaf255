"""Quantization with NVIDIA Model Optimizer (modelopt): PTQ, per-level scales, QAT, export.

    ptq.py         quantize(model, format, forward_loop, per_level): modelopt PTQ
    formats.py     format names -> modelopt configs
    levels.py      per-iteration activation scales for the looped core
    checkpoint.py  dist checkpoint + modelopt state (Megatron-LM's layout); the job's QAT hooks
    run.py         what tools/quantize.py does: measure formats, save a quantized checkpoint
    export.py      the Hugging Face folder of a quantized checkpoint
Importing this package does not import modelopt; the functions that need it do.
"""
