"""The user cache folder of mbmerge (the zoo, statistics, evaluation scores, bench fixtures)."""
import os
from pathlib import Path


def cache_dir() -> Path:
    """MBMERGE_CACHE, else $XDG_CACHE_HOME/mbmerge, else ~/.cache/mbmerge (read at each call)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mbmerge"
    return Path(os.environ.get("MBMERGE_CACHE", default))
