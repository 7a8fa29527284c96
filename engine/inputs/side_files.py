"""The files a merged folder takes from its reference model besides the weights: config, generation
config, tokenizer files, chat template. Each is parsed before the merge starts, so a broken one is
refused in one line instead of being copied into a folder transformers cannot load; the copies'
digests go into mbmerge.json, and `mbmerge verify` parses them again. Knows nothing of tensors.
"""
import json
import shutil
from pathlib import Path

from ...common.errors import BadModel
from .index import INDEX_FILE

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")
NOT_COPIED = {INDEX_FILE, "README.md", "mbmerge.json", "pytorch_model.bin.index.json"}
TEXT_SUFFIXES = (".txt", ".jinja", ".md")
TORCH_DTYPE = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


def side_files(folder: Path) -> list[Path]:
    """The files copied from a model folder: everything but hidden files, weights, the weight index
    and what mbmerge writes itself."""
    return [f for f in sorted(Path(folder).iterdir()) if not f.name.startswith(".") and f.is_file()
            and f.name not in NOT_COPIED and f.suffix not in WEIGHT_SUFFIXES]


def problems(folder: Path) -> list[str]:
    """One line per side file that does not parse: JSON files as JSON (config.json as an object
    with a model_type), text files as UTF-8. Binary files (tokenizer.model) are taken as they are."""
    found = []
    for f in side_files(folder):
        try:
            text = f.read_bytes().decode("utf-8")
            value = json.loads(text) if f.suffix == ".json" else None
            if f.name == "config.json" and not (isinstance(value, dict) and isinstance(value.get("model_type"), str)):
                found.append(f"{f}: not a model config (a JSON object with a model_type); transformers "
                             f"could not load the merged model")
        except UnicodeDecodeError:
            if f.suffix == ".json" or f.suffix in TEXT_SUFFIXES:
                found.append(f"{f}: not UTF-8 text: the file is corrupt")
        except (ValueError, RecursionError) as e:
            found.append(f"{f}: not valid JSON ({' '.join(str(e).split())}): the file is corrupt")
        except OSError as e:
            found.append(f"{f}: cannot be read ({e.strerror})")
    return found


def check(folder: Path, role: str) -> None:
    """BadModel naming the first broken side file of the reference model (see problems)."""
    found = problems(folder)
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise BadModel(f"{role}: {found[0]}{more}; fix or remove it before merging")


def is_tokenizer_file(name: str) -> bool:
    """A file of a tokenizer (transformers' and sentencepiece's names), its special tokens or chat template."""
    return (name.startswith(("tokenizer", "chat_template", "vocab.", "spiece.", "sentencepiece"))
            or name in ("special_tokens_map.json", "added_tokens.json", "merges.txt"))


def copy(src: Path, folder: Path, out_dtype: str | None, tokenizer: bool = True) -> list[str]:
    """Copy the side files of `src` into `folder` (without the tokenizer's unless `tokenizer`), config's
    dtype set to out_dtype; their names."""
    names = []
    for f in side_files(src):
        if not tokenizer and is_tokenizer_file(f.name):
            continue
        shutil.copyfile(f, folder / f.name)
        names.append(f.name)
    config = folder / "config.json"
    if out_dtype and config.is_file():
        cfg = json.loads(config.read_text())
        for key in [k for k in ("torch_dtype", "dtype") if k in cfg] or ["torch_dtype"]:
            cfg[key] = TORCH_DTYPE[out_dtype]
        config.write_text(json.dumps(cfg, indent=2) + "\n")
    return names


def drop_config(folder: Path, key: str) -> None:
    """A key removed from the output's config.json (and its text_config); the file untouched where neither has it."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    if key not in config and key not in text:
        return
    config.pop(key, None)
    text.pop(key, None)
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def set_config(folder: Path, key: str, value) -> None:
    """A key of the output's config.json (and of its text_config, where that has the key), e.g. the
    vocab_size of a merged vocabulary or the num_hidden_layers of stacked slices."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    config[key] = value
    if isinstance(config.get("text_config"), dict) and key in config["text_config"]:
        config["text_config"][key] = value
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def load_tokenizer(folder: Path, role: str, needed_for: str):
    """The folder's tokenizer, as transformers' AutoTokenizer loads it; BadModel in one line where there is
    none (saying what it is `needed_for`) or it does not load."""
    folder = Path(folder)
    if not any(is_tokenizer_file(f.name) for f in folder.iterdir() if f.is_file()):
        raise BadModel(f"{role} {folder} has no tokenizer (no tokenizer.json, tokenizer_config.json or "
                       f"tokenizer.model): {needed_for}")
    import transformers
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:        # transformers raises many kinds for a folder without a usable tokenizer
        why = " ".join(str(e).split())[:200] or type(e).__name__
        raise BadModel(f"{role} {folder}: its tokenizer cannot be loaded ({why})") from None
