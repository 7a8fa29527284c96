"""Installs the import package `mbmerge` from the top-level folders and the `mbmerge` command.

The repository root is the package (its __init__.py is the public API); each top-level
folder is a subpackage: mbmerge.engine -> engine/, mbmerge.methods -> methods/, ...
"""
from setuptools import setup

SUBPACKAGES = ["engine", "kernels", "methods", "eval", "stats", "bin"]

setup(
    name="mbmerge",
    version="0.1.0",
    description="Memory-efficient streaming merges of fine-tuned LLMs",
    python_requires=">=3.10",
    packages=["mbmerge"] + [f"mbmerge.{p}" for p in SUBPACKAGES],
    package_dir={"mbmerge": ".", **{f"mbmerge.{p}": p for p in SUBPACKAGES}},
    install_requires=[
        "torch>=2.2",
        "safetensors>=0.4",
        "huggingface-hub>=0.23",
        "numpy",
        "click>=8.1",
        "tqdm>=4.60",
        "transformers>=4.44",
        "pyyaml>=6",             # mergekit recipes (--config)
        "lm-eval>=0.4.5",        # the evaluation layer (mbmerge eval, demo)
        "accelerate",            # lm-eval's hf model imports it
        "matplotlib>=3.7",       # demo plots
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6.100"],
    },
    entry_points={"console_scripts": ["mbmerge=mbmerge.bin.cli:main"]},
)
