"""Statistics folders (what `mbmerge stats` writes: safetensors plus STATS_CARD, like a model
folder) as merge inputs, read beside the weights as each expert's `stat`: opened and checked
against the plan before anything is written. Knows nothing of how they were collected.

Tensor names are the model's. A Fisher diagonal or a mask has its weight's shape; a Gram matrix of
a linear weight [out, in] is [in, in].
"""
import json
from pathlib import Path

from ...common.errors import BadModel, BadParameter, MissingTensor, ShapeMismatch
from ...methods import Method
from .header import TensorEntry
from .index import TensorIndex

STATS_CARD = "mbmerge-stats.json"
STAT_DTYPES = ("F64", "F32", "F16", "BF16", "U8", "BOOL")


def read_card(folder: Path) -> dict:
    """The card of a statistics folder; BadModel when it is missing or unreadable."""
    path = Path(folder) / STATS_CARD
    try:
        card = json.loads(path.read_text())
    except FileNotFoundError:
        raise BadModel(f"{folder}: no {STATS_CARD}; not a folder written by `mbmerge stats`") from None
    except (OSError, ValueError) as e:
        raise BadModel(f"{path}: unreadable ({e})") from None
    if not isinstance(card, dict) or "kind" not in card:
        raise BadModel(f"{path}: no 'kind' field; not a folder written by `mbmerge stats`")
    return card


def open_statistics(method: Method, folders: list[Path], roles: list[str],
                    merged: list[TensorEntry]) -> list[TensorIndex]:
    """One checked TensorIndex per expert: of the kind the method needs, holding a statistic of the
    right shape for every merged tensor (its reference entry) that must have one."""
    kind = method.data_statistic.kind
    if len(folders) != len(roles):
        raise BadParameter(f"{len(folders)} statistics folder(s) for {len(roles)} experts; give one per expert")
    indexes = []
    for folder, role in zip(folders, roles):
        card = read_card(folder)
        if card["kind"] != kind:
            raise BadParameter(f"{folder}: holds {card['kind']} statistics; method {method.name} needs {kind}")
        ix = TensorIndex.from_folder(Path(folder), f"statistics of {role}")
        for weight in merged:
            _check(ix, ix.tensors.get(weight.name), weight, method, role)
        indexes.append(ix)
    for weight in merged:  # a tensor some experts have a statistic of and others lack: stale or mixed folders
        have = [weight.name in ix.tensors for ix in indexes]
        if any(have) and not all(have):
            lacking = indexes[have.index(False)].folder
            raise MissingTensor(f"{lacking}: no {kind} statistic for tensor {weight.name}, which the other experts' "
                                f"have")
    return indexes


def _check(ix: TensorIndex, e: TensorEntry | None, weight: TensorEntry, method: Method, role: str) -> None:
    if e is None:
        if method.data_statistic.every_tensor:
            raise MissingTensor(f"{ix.folder}: no {method.data_statistic.kind} statistic for tensor {weight.name} "
                                f"({role}); collect it again, or copy the tensor with --keep-base")
        return
    want = weight.shape if not method.data_statistic.whole else (weight.shape[-1],) * 2
    if e.shape != want or e.dtype not in STAT_DTYPES or (method.data_statistic.whole and len(weight.shape) != 2):
        raise ShapeMismatch(f"{e.file}: tensor {e.name} is {e.dtype}{list(e.shape)}; a {method.data_statistic.kind} "
                            f"statistic of {weight.name} {list(weight.shape)} must be {list(want)}, of a float "
                            f"or 0/1 dtype")
