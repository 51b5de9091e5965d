from setuptools import find_packages, setup

setup(
    name="megatron-looprpt",
    version="0.1.0",
    description="Looped language models (Ouro) and LoopRPT reinforcement pre-training on megatron-core",
    packages=find_packages(include=["megatron_looprpt", "megatron_looprpt.*"]),
    python_requires=">=3.10",
    install_requires=[
        # CPU users: `pip install torch==2.13.0` first, or pip pulls the CUDA wheels.
        "torch>=2.4,<2.14",
        "megatron-core>=0.16.0,<0.20",
        "numpy>=1.24,<3",
        "sentencepiece>=0.2,<0.3",
        "tokenizers>=0.15,<1",
        "safetensors>=0.4,<1",
        "packaging",
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]>=2.0"],
        "wandb": ["wandb"],
        "tensorboard": ["tensorboard"],
        "plots": ["matplotlib"],
        "rl": ["math-verify>=0.7"],
        # math-verify: the test suite checks both answer verifiers on the same cases
        "test": ["pytest>=7", "pytest-timeout", "math-verify>=0.7"],
    },
)
