"""mbmerge: memory-efficient streaming merges of fine-tuned LLMs.

    >>> import mbmerge
    >>> mbmerge.merge("ties", base="google/gemma-2-2b", experts=["math", "code"], out="m/", density=0.2)
    >>> mbmerge.methods.ties(b, [x1, x2], density=0.2)      # plain tensors, no files

Layers, each importing only those below it (tests/test_layers.py reads the import graph):

    bin        the `mbmerge` command (click)
    tune       evaluation-guided search: grids, Hi-Merging
    library    the library entries (library.py): mbmerge.merge, a merge completed for the engine (the
               built-in family, statistics collected), and mbmerge.moe, a Mixture of Experts (its routers
               from stats/), above the two siblings it joins
    stats      data statistics of experts (Fisher, Grams, trained masks)     } siblings: neither
    eval       lm-eval glue, the mini zoo and the synthetic bench fixtures    } imports the other
    engine     the streaming engine, in rooms (engine/__init__.py): inputs, the core, output, adapters, recipes
    methods    pure per-tensor merge functions and the method table
    kernels    torch references, Triton kernels and compiled CPU loops of the heavy steps
    common     errors, the cache folder, MergeBench's names, tensor roles; what stats and eval both
               need: the zoo's domains (common/domains.py) and quieting transformers (common/quiet.py)

Attributes are imported on first use, so `import mbmerge` (and the command's --help) stays free of torch.
"""
import importlib

from .common import VERSION as __version__  # noqa: F401

_ATTRIBUTES = {"merge": ".library", "moe": ".library", "collect_statistics": ".library", "MergeSpec": ".engine.spec",
               "MbmergeError": ".common.errors"}
_SUBPACKAGES = ("bin", "common", "engine", "eval", "kernels", "methods", "stats", "tune")


def __getattr__(name: str):
    if name in _ATTRIBUTES:
        return getattr(importlib.import_module(_ATTRIBUTES[name], __name__), name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    # the lazy attributes too, so dir(mbmerge) and tab completion show them before their first use
    return sorted({*globals(), *_ATTRIBUTES, *_SUBPACKAGES})
