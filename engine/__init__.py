"""The streaming engine: sources, validated safetensors index, plan, executor, writer."""
from .api import collect_statistics, merge, run  # noqa: F401
from .errors import MbmergeError  # noqa: F401
from .spec import VERSION, MergeSpec  # noqa: F401
