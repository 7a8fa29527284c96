"""Writing a statistics folder: tensors arrive one by one from a collector (as each memory group
finishes) and are flushed to numbered safetensors shards once SHARD_BYTES are buffered, so the
writer never holds more than a shard; an index maps names to shards, as in a model folder, and the
card (STATS_CARD) says what was collected from what. Built in a temporary folder, renamed at the end.
"""
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..common.errors import OutputExists
from ..engine.inputs.index import INDEX_FILE
from ..engine.inputs.stats_folders import STATS_CARD

SHARD_BYTES = 2 << 30


class StatsWriter:
    def __init__(self, out: Path, overwrite: bool = False, shard_bytes: int = SHARD_BYTES):
        self.out = Path(out)
        if self.out.exists() and any(self.out.iterdir()) and not overwrite:
            raise OutputExists(f"{self.out}: exists and is not empty (pass --overwrite to replace it)")
        self.tmp = self.out.with_name(f".{self.out.name}.partial-{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.shard_bytes, self.pending, self.pending_bytes = shard_bytes, {}, 0
        self.weight_map: dict[str, str] = {}

    def __call__(self, name: str, tensor: torch.Tensor) -> None:
        """Take one statistic (a collector's `emit`)."""
        self.pending[name] = tensor.detach().to("cpu").contiguous()
        self.pending_bytes += tensor.numel() * tensor.element_size()
        if self.pending_bytes >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        shard = f"stats-{len(set(self.weight_map.values())) + 1:05d}.safetensors"
        save_file(self.pending, self.tmp / shard, metadata={"format": "pt"})
        self.weight_map.update({n: shard for n in self.pending})
        self.pending, self.pending_bytes = {}, 0

    def publish(self, card: dict, overwrite: bool = False) -> Path:
        """Write the last shard, the index and the card; move the folder into place."""
        self._flush()
        total = sum((self.tmp / s).stat().st_size for s in set(self.weight_map.values()))
        index = {"metadata": {"total_size": total}, "weight_map": self.weight_map}
        (self.tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (self.tmp / STATS_CARD).write_text(json.dumps(card, indent=2, default=str) + "\n")
        if self.out.exists() and overwrite:
            shutil.rmtree(self.out)
        try:
            os.replace(self.tmp, self.out)      # onto nothing, or an empty folder
        except OSError:
            self.discard()
            raise OutputExists(f"{self.out}: filled while the statistics were collected; nothing replaced") from None
        return self.out

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
