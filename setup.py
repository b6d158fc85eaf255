from setuptools import find_packages, setup

setup(
    name="spiral_megatron",
    version="0.1.0",
    description="SpiralFormer (looped multi-resolution transformer) on Megatron-Core",
    packages=find_packages(include=["spiral_megatron", "spiral_megatron.*"]),
    package_data={"spiral_megatron": ["data/*", "hf/*.py"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16,<0.20",
        "numpy",
        "pyyaml",
        "psutil",
        "tokenizers",
    ],
    extras_require={
        "hf": ["transformers>=4.45", "safetensors"],
        "tensorboard": ["tensorboard"],
        "te": ["transformer-engine[pytorch]"],
        "modelopt": ["nvidia-modelopt", "requests", "huggingface_hub"],
        "research": ["matplotlib", "lm-eval[hf]"],  # tools/probe.py, ablate.py plots; lm-eval on HF folders
        "dev": ["pytest", "pytest-timeout", "matplotlib", "lm-eval[hf]"],  # the research-tool tests need both
    },
)
