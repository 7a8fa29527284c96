"""Installs the import package `mbmerge` from the repository root and the `mbmerge` command.

The root is the package (its __init__.py is the public API); each top-level folder with an
__init__.py is a subpackage, found by find_packages: mbmerge.engine -> engine/, mbmerge.tune ->
tune/, ... (tests/test_packaging.py builds the wheel and checks that none is left out).
"""
import re
from pathlib import Path

from setuptools import Extension, find_packages, setup

SUBPACKAGES = find_packages(exclude=["tests", "tests.*", "build", "build.*"])
# The fused CPU merges (kernels/cpu_merge.c), loaded with ctypes (kernels/cpu.py). Optional: without a
# C compiler the install goes on and merges use the torch methods.
CPU_KERNELS = Extension("mbmerge.kernels._cpu_merge", ["kernels/cpu_merge.c"], optional=True, libraries=["m"],
                        extra_compile_args=["-O3", "-mavx2", "-mf16c", "-fno-fast-math", "-ffp-contract=off",
                                            "-std=gnu11"])
VERSION = re.search(r'^VERSION = "(.+)"$', Path("common/__init__.py").read_text(), re.M).group(1)

setup(
    name="mbmerge",
    version=VERSION,
    description="Memory-efficient streaming merges of fine-tuned LLMs",
    python_requires=">=3.10",
    packages=["mbmerge"] + [f"mbmerge.{p}" for p in SUBPACKAGES],
    package_dir={"mbmerge": ".", **{f"mbmerge.{p}": p.replace(".", "/") for p in SUBPACKAGES}},
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
        # peft folds adapters: the LoRA tests' reference; psycopg2 reaches the PostgreSQL server the tuning
        # tests start (when the machine has one) to share a study as machines would
        "test": ["pytest>=8", "hypothesis>=6.100", "peft>=0.13", "psycopg2-binary>=2.9"],
        # mbmerge tune: Optuna's studies (in SQLAlchemy databases) and samplers (CMA-ES needs cmaes),
        # Ray to run trials on many cores, GPUs and machines
        "tune": ["optuna>=4.0", "sqlalchemy>=2.0", "cmaes>=0.10", "ray>=2.9"],
    },
    ext_modules=[CPU_KERNELS],
    package_data={"mbmerge.kernels": ["cpu_merge.c"]},
    entry_points={"console_scripts": ["mbmerge=mbmerge.bin.cli:main"]},
)
