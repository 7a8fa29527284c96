"""The streaming engine: sources, validated safetensors index, plan, executor, writer."""
from ..common.errors import MbmergeError  # noqa: F401
from .api import merge, run, sources  # noqa: F401
from .spec import VERSION, MergeSpec, spec_from  # noqa: F401
