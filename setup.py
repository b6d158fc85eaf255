from setuptools import find_packages, setup

MODELOPT = ["nvidia-modelopt>=0.47,<0.48", "requests", "huggingface_hub"]  # 0.47 tested; it imports the other two
RESEARCH = ["matplotlib", "lm-eval[hf]", "tqdm"]  # tools/probe.py and ablate.py plots; lm-eval on HF folders

setup(
    name="spiral_megatron",
    version="0.1.0",
    description="SpiralFormer (looped multi-resolution transformer) on Megatron-Core",
    packages=find_packages(include=["spiral_megatron", "spiral_megatron.*"]),
    package_data={"spiral_megatron": ["job/data/*", "hf/*.py"]},
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
        "hf": ["transformers>=5.25,<6", "safetensors", "tqdm"],  # 5.25: the Cache API SpiralCache implements
        "tensorboard": ["tensorboard"],
        "te": ["transformer-engine[pytorch]"],
        "modelopt": MODELOPT,
        "research": RESEARCH,
        "dev": ["pytest", "pytest-timeout", "pytest-xdist", "accelerate", "peft", *RESEARCH, *MODELOPT],  # every test's needs
    },
)
