"""Megatron <-> Hugging Face conversion for SpiralFormer.

`mapping`     the name table and named transforms (pure functions over state dicts)
`hf_config`   ModelArgs <-> SpiralFormerConfig, refusing what the HF model cannot express
`megatron_io` reading/writing the training script's checkpoints (any TP/PP layout, one process)
`hf_io`       writing/reading the HF folder (safetensors only)
`convert`     both conversions end to end, plus `verify`
"""
