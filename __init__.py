"""mbmerge: memory-efficient streaming merges of fine-tuned LLMs.

    >>> import mbmerge
    >>> mbmerge.merge("ties", base="google/gemma-2-2b", experts=["math", "code"], out="m/", density=0.2)
    >>> mbmerge.methods.ties(b, [x1, x2], density=0.2)      # plain tensors, no files
"""
# engine first: it imports methods, which need only engine.errors from it
from .engine import MbmergeError, MergeSpec, collect_statistics, merge  # noqa: F401
from .engine.spec import VERSION as __version__  # noqa: F401
from . import methods  # noqa: F401,E402
