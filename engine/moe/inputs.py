"""What a MoE is assembled from, resolved and checked before anything is computed or written: the base, the
routed and shared experts as models (folders, hub ids, MergeBench domains, model+adapter), the output
architecture they fit, and every output tensor with its one source: a base tensor (attention, norms,
embeddings, head), an expert's dense MLP weight moved under its expert name, or a computed one (a router, a
shared expert's gate, Qwen2-MoE's zero attention biases where the base has none).
"""
import json
from dataclasses import dataclass
from pathlib import Path

from ...common.errors import BadModel, BadParameter, MissingTensor, ShapeMismatch
from ...common.roles import dense_mlp, layer_of
from ..inputs.header import DTYPES, TensorEntry, dtype_name
from ..inputs.resolve import Source, resolve
from ..models import Model, on_base, stored_model
from .architectures import MLP, Architecture, choose
from .recipe import MoeExpert, MoeRecipe


@dataclass(frozen=True, kw_only=True)
class Piece:
    """One output tensor: `entry` names and shapes it; it is read from model `model` (0 the base, then the routed
    experts, then the shared ones) at `source`, or computed (model None); an expert's MLP weight takes that
    expert's noise and, for down_proj, its residual scale."""
    entry: TensorEntry
    model: int | None
    source: TensorEntry | None = None
    expert: MoeExpert | None = None
    residual: bool = False


@dataclass(frozen=True, kw_only=True)
class MoeInputs:
    recipe: MoeRecipe
    sources: list[Source]          # base, experts, shared experts
    models: list[Model]
    architecture: Architecture
    config: dict                   # the base's config.json
    pieces: list[Piece]            # in output order: each layer's base tensors, then its experts and routers
    dtypes: list[str]              # each piece's output dtype

    @property
    def layers(self) -> int:
        return self.config["num_hidden_layers"]


def read_inputs(recipe: MoeRecipe) -> MoeInputs:
    """The models resolved and indexed, the architecture chosen, every output tensor planned; BadModel,
    ShapeMismatch or MissingTensor in one line naming the model and tensor."""
    base = resolve(recipe.base, "base")
    sources = [base] + [on_base(resolve(e.source, f"expert {e.source}", recipe.base), base)
                        for e in recipe.experts + recipe.shared_experts]
    models = [stored_model(s) for s in sources]
    configs = [_config(s) for s in sources]
    arch = choose(recipe, [c.get("model_type") for c in configs])
    mlp = _dense_mlp(models[0])
    for m in models[1:]:
        _check_expert(m, mlp)
    pieces = _pieces(recipe, arch, models, mlp, configs[0])
    out = dtype_name(recipe.dtype) if recipe.dtype else _config_dtype(configs[0])
    dtypes = [out or p.entry.dtype for p in pieces]
    return MoeInputs(recipe=recipe, sources=sources, models=models, architecture=arch, config=configs[0],
                     pieces=pieces, dtypes=dtypes)


def _config(s: Source) -> dict:
    path = s.path / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BadModel(f"{s.role}: {path} is missing or not JSON ({type(e).__name__}); a MoE needs each "
                       f"model's config") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise BadModel(f"{s.role}: {path} is not a model config (a JSON object with a model_type)")
    return config


def _config_dtype(config: dict) -> str | None:
    """The dtype the base's config declares (transformers 5 `dtype`, earlier `torch_dtype`), as mergekit-moe
    takes it for the output; None where it declares none."""
    name = config.get("dtype") or config.get("torch_dtype")
    try:
        return dtype_name(str(name).removeprefix("torch.")) if name else None
    except BadParameter:
        return None


def _dense_mlp(base: Model) -> dict[tuple[int, str], TensorEntry]:
    found = {key: e for n, e in base.index.tensors.items() if (key := dense_mlp(n))}
    if not found:
        raise BadModel(f"base {base.ref}: no dense MLP weights (model.layers.N.mlp.gate_proj/up_proj/down_proj"
                       f".weight); a MoE is built from Llama-style dense models")
    return found


def _check_expert(m: Model, mlp: dict) -> None:
    for (layer, proj), e in sorted(mlp.items()):
        mine = m.index.tensors.get(e.name)
        if mine is None:
            raise MissingTensor(f"{m.role} ({m.stored.folder}): no tensor {e.name}, which the base has")
        if mine.shape != e.shape:
            raise ShapeMismatch(f"{m.role} ({m.stored.folder}): tensor {e.name} {list(mine.shape)} vs base "
                                f"{list(e.shape)}; a MoE's experts have the base's hidden and MLP sizes")


def _pieces(recipe: MoeRecipe, arch: Architecture, models: list[Model], mlp: dict, config: dict) -> list[Piece]:
    """The output's tensors in order: the base's in file order without its MLPs, each layer's MoE tensors right
    after the base's last tensor of that layer."""
    base = models[0].index
    kept = [e for n, e in base.tensors.items() if dense_mlp(n) is None]
    last = {layer_of(e.name): k for k, e in enumerate(kept)}
    pieces = []
    for k, e in enumerate(kept):
        pieces.append(Piece(entry=e, model=0, source=e))
        layer = layer_of(e.name)
        if layer is not None and last[layer] == k:
            pieces += _layer_pieces(recipe, arch, models, mlp, layer, config, base.tensors)
    return pieces


def _layer_pieces(recipe, arch: Architecture, models, mlp, layer: int, config: dict, base_tensors) -> list[Piece]:
    n, hidden = len(recipe.experts), config["hidden_size"]
    experts = list(enumerate(recipe.experts + recipe.shared_experts, start=1))
    out = []
    if arch.zero_attention_bias:
        out += _zero_biases(layer, config, base_tensors)
    for model, expert in experts:
        for proj in MLP:
            src = models[model].index.tensors[mlp[(layer, proj)].name]
            name = arch.expert(layer, model - 1, proj) if model <= n else arch.shared_expert(layer, proj)
            out.append(Piece(entry=_renamed(src, name), model=model, source=src, expert=expert,
                             residual=proj == "down_proj"))
    out.append(Piece(entry=_computed(arch.router(layer), (n, hidden)), model=None))
    if arch.shared_gate is not None:
        out.append(Piece(entry=_computed(arch.shared_gate(layer), (1, hidden)), model=None))
    return out


def _zero_biases(layer: int, config: dict, base_tensors) -> list[Piece]:
    """Qwen2-MoE's q/k/v biases, zero, where the base (a Llama) has none: the same outputs, and the layout
    every Qwen2-MoE reader expects."""
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    out = []
    for proj, n in (("q_proj", heads), ("k_proj", kv), ("v_proj", kv)):
        name = f"model.layers.{layer}.self_attn.{proj}.bias"
        if name not in base_tensors:
            out.append(Piece(entry=_computed(name, (n * head_dim,)), model=None))
    return out


def _renamed(e: TensorEntry, name: str) -> TensorEntry:
    return TensorEntry(name=name, file=e.file, offset=e.offset, nbytes=e.nbytes, dtype=e.dtype, shape=e.shape)


def _computed(name: str, shape: tuple[int, ...]) -> TensorEntry:
    """The entry of a tensor computed in float32 (no file of its own)."""
    numel = 1
    for d in shape:
        numel *= d
    return TensorEntry(name=name, file=Path(), offset=0, nbytes=numel * DTYPES["F32"].itemsize, dtype="F32",
                       shape=tuple(shape))
