"""Tied against untied output heads. An expert that ties its head to its input embedding (no
lm_head.weight; its config does not untie them) merges its embedding as its head where the reference
model has a head of its own; where the reference ties them, the output does too (it follows the
reference's config), and an untied expert's own head is left out. Each choice is a note for the card.
Knows nothing of the methods.
"""
import json
from dataclasses import replace
from pathlib import Path

from ...common.roles import EMBEDDINGS, HEAD, ties_head
from .index import TensorIndex


def reconcile(ref: TensorIndex, experts: list[tuple[str, TensorIndex]]) -> tuple[list[TensorIndex], list[str]]:
    """The experts' indexes [(label, index), ...] as the merge reads them, and one note per expert changed."""
    out, notes = [], []
    for label, ex in experts:
        embed = next((n for n in EMBEDDINGS if n in ex.tensors and n in ref.tensors), None)
        if embed and HEAD in ref.tensors and HEAD not in ex.tensors and _ties(ex.folder):
            ex = replace(ex, tensors={**ex.tensors, HEAD: replace(ex.tensors[embed], name=HEAD)})
            notes.append(f"{label} ties its {HEAD} to its {embed}: that embedding is merged as its head")
        elif embed and HEAD not in ref.tensors and HEAD in ex.tensors:
            ex = replace(ex, tensors={n: e for n, e in ex.tensors.items() if n != HEAD})
            notes.append(f"{label} has its own {HEAD}, left out: the reference model ties its head to {embed}, "
                         f"and so does the output")
        out.append(ex)
    return out, notes


def _ties(folder: Path) -> bool:
    """Whether a model's config ties its head to its embedding (common/roles.py: ties_head)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and ties_head(config)
