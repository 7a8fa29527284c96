"""Model folder -> TensorIndex (name -> file, offset, nbytes, dtype, shape), and the check that
experts agree with the base. Reads headers only, never tensor data; knows nothing of merging.
"""
import json
from dataclasses import dataclass
from pathlib import Path

from ...common.errors import BadHeader, BadModel, BadOffsets, MissingTensor, ShapeMismatch
from .header import DTYPES, FLOAT_DTYPES, TensorEntry, read_header

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


@dataclass(frozen=True, kw_only=True)
class TensorIndex:
    """Every tensor of one model folder, in file order (shard by shard, by offset)."""
    folder: Path
    tensors: dict[str, TensorEntry]
    shards: tuple[str, ...]        # file names, in order
    sharded: bool                  # True when the folder has an index.json
    metadata: dict[str, str]

    @classmethod
    def from_folder(cls, folder: Path, label: str = "model") -> "TensorIndex":
        folder = Path(folder)
        if not folder.is_dir():
            what = "is not a folder" if folder.exists() else "no such folder"
            raise BadModel(f"{_where(label, folder)}: {what}")
        shards, weight_map = _shard_files(folder, label)
        _check_links(folder, label)
        tensors, metadata = {}, {}
        for shard in shards:
            try:
                entries, metadata = read_header(folder / shard)
            except (BadHeader, BadOffsets) as e:
                raise type(e)(f"{_role(label, folder)} {e}") from None
            for name, entry in entries.items():
                if name in tensors:
                    raise BadModel(f"{_where(label, folder)}: tensor {name!r} is in both "
                                   f"{tensors[name].file.name} and {shard}")
                tensors[name] = entry
        for name, shard in (weight_map or {}).items():
            if name not in tensors or tensors[name].file != folder / shard:
                raise MissingTensor(f"{_where(label, folder)}: {INDEX_FILE} lists tensor {name!r} in "
                                    f"{shard} but that file does not hold it")
        return cls(folder=folder, tensors=tensors, shards=tuple(shards), sharded=weight_map is not None,
                   metadata=metadata)


def _shard_files(folder: Path, label: str) -> tuple[list[str], dict | None]:
    if (folder / INDEX_FILE).is_file():
        weight_map = _read_weight_map(folder, label)
        shards = sorted(set(weight_map.values()))
        for s in shards:
            _check_inside(folder, s, label)
        return shards, weight_map
    if (folder / SINGLE_FILE).is_file():
        _check_inside(folder, SINGLE_FILE, label)
        return [SINGLE_FILE], None
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    if found:
        for s in found:
            _check_inside(folder, s, label)
        return found, None
    pickles = sorted(p.name for pat in PICKLE_PATTERNS for p in folder.glob(pat))
    if pickles:
        raise BadModel(f"{_where(label, folder)}: holds only pickle checkpoints ({', '.join(pickles[:3])}), "
                       f"which mbmerge never loads: convert them to safetensors")
    raise BadModel(f"{_where(label, folder)}: no safetensors files (model.safetensors or {INDEX_FILE})")


def _read_weight_map(folder: Path, label: str) -> dict[str, str]:
    path = folder / INDEX_FILE
    try:
        weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
    except OSError as e:
        raise BadModel(f"{_where(label, folder)}: {INDEX_FILE} cannot be read ({e.strerror or e})") from None
    except (ValueError, KeyError, TypeError, RecursionError):
        raise BadModel(f"{_where(label, folder)}: {INDEX_FILE} is not a JSON object with a weight_map") from None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise BadModel(f"{_where(label, folder)}: {INDEX_FILE}'s weight_map must map tensor names to file names")
    if not weight_map:
        raise BadModel(f"{_where(label, folder)}: {INDEX_FILE} lists no tensors")
    return weight_map


def _check_inside(folder: Path, name: str, label: str) -> None:
    """Refuse shard paths (or symlinks) that lead outside the model folder."""
    path, where = folder / name, _where(label, folder)
    if not name.isprintable():  # NUL, newlines, lone surrogates: no such shard, and no one-line message
        raise BadModel(f"{where}: shard path {name!r} holds control characters")
    if Path(name).is_absolute() or not _inside(path, folder):
        raise BadModel(f"{where}: shard path {name!r} points outside the model folder")
    if Path(name).name != name:
        raise BadModel(f"{where}: shard path {name!r} is in a subfolder; shards must lie in the model folder")
    if not name.endswith(".safetensors"):  # the output reuses shard names: no clash with README.md & co
        raise BadModel(f"{where}: shard {name!r} is not named *.safetensors")
    try:
        is_file, exists = path.is_file(), path.exists()
    except OSError as e:  # a name too long for the file system
        raise BadModel(f"{where}: shard {name!r} cannot be opened ({e.strerror or e})") from None
    if not is_file:
        raise BadModel(f"{where}: shard {name} is " + ("not a file" if exists else "missing"))


def _check_links(folder: Path, label: str) -> None:
    """Refuse symlinks that lead outside the model folder: the output copies config, tokenizer
    and other side files, which must not become any file of the user's."""
    for f in folder.iterdir():
        if f.is_symlink() and not f.name.startswith(".") and not _inside(f, folder):
            raise BadModel(f"{_where(label, folder)}: symlink {f.name!r} points outside the model folder")


def _inside(path: Path, folder: Path) -> bool:
    """Whether `path` resolves inside the folder (a symlink loop or an unencodable name: no)."""
    try:
        return path.resolve().is_relative_to(_root(folder))
    except (OSError, ValueError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
        return False


def _where(label: str, folder: Path) -> str:
    return f"{_role(label, folder)} {folder}"


def _role(label: str, folder: Path) -> str:
    """'expert' from a label that already ends with the folder ('expert /m/code'), else the label."""
    return label.removesuffix(str(folder)).rstrip() or label


def _root(folder: Path) -> Path:
    """The folder files may resolve into: a hub cache snapshot links into its repo's blobs/."""
    f = folder.resolve()
    if f.parent.name == "snapshots" and f.parent.parent.name.startswith("models--"):
        return f.parent.parent
    return f


def check_agreement(base: TensorIndex, experts: dict[str, TensorIndex], base_label: str = "base") -> None:
    """Every expert must have exactly the base's tensor names and shapes, and its dtypes up to the
    float width (a bf16 base merges with an fp32 expert: the maths is float32 either way).

    Raises MissingTensor or ShapeMismatch in one line: per expert the first few disagreements and a
    count, and the likely cause when it is a resized vocabulary.
    """
    missing, mismatched, vocab = [], [], False
    for label, ex in experts.items():
        lacks = [n for n in base.tensors if n not in ex.tensors]
        extra = [n for n in ex.tensors if n not in base.tensors]
        who = f"expert {label!r}" + ("" if label == str(ex.folder) else f" ({ex.folder})")
        if lacks:
            missing.append(f"{who} lacks {_few(lacks)} that {base_label} has")
        if extra:
            missing.append(f"{who} has {_few(extra)} that {base_label} lacks")
        differ = [(e, b) for name, b in base.tensors.items() if (e := ex.tensors.get(name)) is not None
                  and (e.shape != b.shape or (e.dtype != b.dtype and not {e.dtype, b.dtype} <= set(FLOAT_DTYPES)))]
        if differ:
            shown = ", ".join(f"{e.name} {e.dtype}{list(e.shape)} vs {b.dtype}{list(b.shape)}" for e, b in differ[:2])
            mismatched.append(f"{who} differs from {base_label} in {len(differ)} tensor(s) ({shown}"
                              f"{', ...' if len(differ) > 2 else ''})")
            vocab |= all(_resized_rows(e, b) for e, b in differ)
    problems = missing + mismatched
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        why = ("the vocabularies differ (added tokens, a resized embedding): pass --tokenizer-source union, base or "
               "a model (a recipe's tokenizer_source) to merge them" if vocab and not missing
               else "the experts are not fine-tunes of the same model")
        raise (MissingTensor if missing else ShapeMismatch)("; ".join(problems[:3]) + more + f": {why}")


def float_width_notes(base: TensorIndex, experts: dict[str, TensorIndex], base_label: str = "base") -> list[str]:
    """One line per expert stored in another float width than the base (check_agreement accepts them):
    what the merge does about it."""
    notes = []
    for label, ex in experts.items():
        widths = sorted({DTYPES[e.dtype].torch_name for name, b in base.tensors.items()
                         if (e := ex.tensors.get(name)) is not None and e.dtype != b.dtype})
        if widths:
            stored = sorted({DTYPES[b.dtype].torch_name for b in base.tensors.values() if b.dtype in FLOAT_DTYPES})
            notes.append(f"expert {label!r} is stored in {', '.join(widths)} where {base_label} is in "
                         f"{', '.join(stored)}: the merge computes in float32 and writes {base_label}'s dtype "
                         f"(--dtype to choose another)")
    return notes


def _resized_rows(e: TensorEntry, b: TensorEntry) -> bool:
    """An embedding-like tensor that differs only in its number of rows."""
    return len(e.shape) == len(b.shape) == 2 and e.shape[1:] == b.shape[1:] and e.shape[0] != b.shape[0]


def _few(names: list[str]) -> str:
    shown = ", ".join(names[:3])
    return f"{len(names)} tensor(s) ({shown}{', ...' if len(names) > 3 else ''})"
