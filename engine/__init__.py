"""The streaming engine: sources, validated safetensors index, plan, executor, writer. Its names are
imported on first use: the command line reads engine.output and engine.resolve without torch."""
import importlib

_LAZY = {"merge": ".api", "run": ".api", "sources": ".api", "fingerprint": ".api", "MergeSpec": ".spec", "spec_from": ".spec",
         "VERSION": ".spec", "MbmergeError": "..common.errors"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
