"""PEFT LoRA adapters as merge inputs: a model (the base, or mergekit's `model+adapter`) read as it is
with the adapter folded in. A targeted weight W becomes W + s B A (s = alpha / r, or alpha / sqrt(r)
for rsLoRA; an embedding: W + s (B A)^T), computed on the rows of each chunk in float32 as PEFT's
merge_and_unload computes it; weights the adapter saves whole (modules_to_save, a resized
embedding) replace the model's. Reads the adapter's config and tensors, never the model's beyond
the chunks the merge asks for.
"""
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ...common.errors import BadModel
from ..inputs.header import TensorEntry
from ..inputs.index import TensorIndex
from ..inputs.read import MappedModel

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
# settings whose adapters are not B A added to a weight: refused rather than merged wrong
UNSUPPORTED = {"use_dora": "DoRA (a magnitude vector rescales each column)",
               "fan_in_fan_out": "fan_in_fan_out (Conv1D)",
               "lora_bias": "LoRA biases", "use_qalora": "QA-LoRA", "layer_replication": "layer replication",
               "trainable_token_indices": "trainable token indices", "target_parameters": "LoRA on parameters"}


def is_adapter(folder: Path) -> bool:
    return (Path(folder) / CONFIG).is_file()


def has_tokenizer(folder: Path) -> bool:
    """Whether an adapter carries its own tokenizer (a chat adapter that added tokens does)."""
    return any((Path(folder) / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


@dataclass(frozen=True, kw_only=True)
class LowRank:
    """One targeted weight: its A [r, in] and B [out, r] entries, the scale, and whether it is an embedding."""
    a: TensorEntry
    b: TensorEntry
    scale: float
    embedding: bool


@dataclass(frozen=True)
class Adapter:
    index: TensorIndex                 # the adapter's own file
    lows: dict[str, LowRank]               # model tensor -> its LoRA
    whole: dict[str, TensorEntry]      # model tensor -> the weight the adapter saves whole

    def view(self, model: TensorIndex) -> TensorIndex:
        """The model's index as the merge reads it with the adapter folded in."""
        whole = {n: replace(e, name=n) for n, e in self.whole.items()}
        return replace(model, tensors={**model.tensors, **whole,
                                       **{n: _float32(whole.get(n, model.tensors[n])) for n in self.lows}})


def read_adapter(folder: Path, model: TensorIndex, role: str) -> Adapter:
    """The adapter in `folder`, checked against the model's tensors; BadModel in one line naming the
    folder and the setting mbmerge cannot fold."""
    folder = Path(folder)
    try:
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BadModel(f"{role}: {folder / CONFIG} cannot be read as JSON ({e})") from None
    where = f"{role}: adapter {folder}"
    if config.get("peft_type", "LORA") != "LORA":
        raise BadModel(f"{where} is a {config['peft_type']} adapter; mbmerge merges LoRA adapters")
    for key, what in UNSUPPORTED.items():
        if config.get(key) not in (None, False, [], {}, "none"):
            raise BadModel(f"{where} uses {what} ({key} in {CONFIG}), which mbmerge cannot fold into weights")
    if config.get("bias", "none") != "none":
        raise BadModel(f"{where} trains biases (bias: {config['bias']}), which mbmerge cannot fold into weights")
    if not (folder / WEIGHTS).is_file():
        raise BadModel(f"{where} has no {WEIGHTS} (pickled adapters are never loaded)")
    index = TensorIndex.from_folder(folder, role)
    parts, whole = {}, {}
    for name, e in index.tensors.items():
        inner = name.removeprefix(PREFIX)
        if m := re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight|(.+)\.(lora_embedding_A|lora_embedding_B)", inner):
            module, kind = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
            parts.setdefault(module, {})[kind[-1]] = e
            parts[module]["embedding"] = "embedding" in kind
        elif ".original_module." not in inner:       # PEFT may save the untrained copy too: not the adapter's
            whole[re.sub(r"\.(base_layer|modules_to_save(\.default)?)\.", ".", inner)] = e
    lows = {}
    for module, p in parts.items():
        target = f"{module}.weight"
        if target not in model.tensors or set(p) != {"A", "B", "embedding"}:
            raise BadModel(f"{where}: {module} has no weight {target} in the model it adapts (or lacks lora_A/B)")
        r = p["A"].shape[0]
        alpha = _pattern(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
        scale = alpha / (r ** 0.5 if config.get("use_rslora") else r)
        low = LowRank(a=p["A"], b=p["B"], scale=scale, embedding=p["embedding"])
        _check_shapes(where, target, whole.get(target, model.tensors[target]).shape, low)
        lows[target] = low
    for target, e in whole.items():
        if target not in model.tensors:
            raise BadModel(f"{where}: it saves {target}, which the model it adapts lacks")
    return Adapter(index, lows, whole)


def _pattern(patterns: dict, module: str, default):
    """PEFT's per-module value: a key equal to the module's name, else one that ends it at a dot."""
    for key, value in patterns.items():
        if key == module or re.fullmatch(rf"(.*\.)?({key})", module):
            return value
    return default


def _check_shapes(where: str, target: str, shape: tuple, low: LowRank) -> None:
    rows, cols = (shape[0], shape[1]) if len(shape) == 2 else (None, None)
    a, b = low.a.shape, low.b.shape
    out, inp = (a[1], b[0]) if low.embedding else (b[0], a[1])
    if (rows, cols) != (out, inp) or a[0] != b[1]:
        raise BadModel(f"{where}: the LoRA of {target} (A {list(a)}, B {list(b)}) does not fit its shape {list(shape)}")


class AdaptedModel(MappedModel):
    """A MappedModel of a model with a LoRA adapter folded in: each adapted weight in float32 (its entry
    says F32), the weights the adapter saves whole read from the adapter's file."""

    def __init__(self, model: TensorIndex, adapter: Adapter):
        super().__init__(model)
        self.adapter = MappedModel(adapter.index)
        self.sources = {**model.tensors, **adapter.whole}         # the weight each output row starts from
        self.lows, self.whole, self._factors = adapter.lows, adapter.whole, (None, None)
        self.index = adapter.view(model)

    def chunk(self, entry: TensorEntry, start: int, stop: int) -> torch.Tensor:
        name = entry.name
        if name not in self.lows:
            return self._source(name, start, stop)
        if stop <= start:
            return super().chunk(entry, start, stop)      # empty, float32
        width = entry.shape[1]
        first, end = start // width, -(-stop // width)
        w = self._source(name, first * width, end * width).float().view(end - first, width)
        a, b = self._low(name)
        # PEFT's order: the product, then the scale, then the sum
        delta = (a[:, first:end].T @ b.T if self.lows[name].embedding else b[first:end] @ a) * self.lows[name].scale
        return (w + delta).view(-1)[start - first * width: stop - first * width]

    def release(self, entry: TensorEntry, start: int, stop: int) -> None:
        if entry.name in self.lows:
            width = entry.shape[1]
            start, stop = start // width * width, min(entry.numel, -(-stop // width) * width)
        source = self.sources[entry.name]
        owner = self.adapter if entry.name in self.whole else super()
        owner.release(source, start, stop)

    def prefetch(self, entry: TensorEntry, *args) -> None:
        if entry.name not in self.whole:
            super().prefetch(self.sources[entry.name], *args)

    def close(self) -> None:
        self.adapter.close()
        super().close()

    def _source(self, name: str, start: int, stop: int) -> torch.Tensor:
        if name in self.whole:
            return self.adapter.chunk(self.whole[name], start, stop)
        return super().chunk(self.sources[name], start, stop)

    def _low(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B of one weight in float32, read once while its chunks are merged."""
        if self._factors[0] != name:
            low = self.lows[name]
            a, b = (self.adapter.chunk(e, 0, e.numel).view(e.shape).float() for e in (low.a, low.b))
            self._factors = (name, (a, b))
        return self._factors[1]


def _float32(e: TensorEntry) -> TensorEntry:
    return replace(e, dtype="F32", nbytes=e.numel * 4)
