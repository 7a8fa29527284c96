"""One decoder layer at a time: a model of the base's architecture with a single layer slot (no final norm or
head), so a collector can carry activations through a model layer by layer with one layer's weights in memory
(RegMean++'s Grams, the MoE routers' hidden states). A pre-hook hands the slot its cached input, a hook takes
its output.
"""
import contextlib
import copy
from pathlib import Path

import torch

from ..common.errors import BadModel
from ..engine.inputs.quantized import open_model
from ..engine.inputs.read import MappedModel


class _Stop(Exception):
    """Raised by a hook once the layer slot's input is taken: nothing after it needs to run."""


def layer_tensors(m: MappedModel, layer: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Decoder layer `layer` of a model in `dtype`, named as inside the layer ("self_attn.q_proj.weight")."""
    prefix = f"model.layers.{layer}."
    out = {}
    for n, e in m.index.tensors.items():
        if n.startswith(prefix):
            out[n.removeprefix(prefix)] = m.chunk(e, 0, e.numel).to(dtype, copy=True).view(e.shape)
            m.release(e, 0, e.numel)      # the mapped pages leave this process: memory stays one layer
    m.flush()
    if not out:
        raise BadModel(f"{m.index.folder}: no tensors of decoder layer {layer} ({prefix}*)")
    return out


def _no_init():
    """transformers' own switch that skips initialising weights about to be replaced (the slot's embeddings are
    the base's, its norm and head are dropped, its layer is loaded before it runs); a no-op where it is gone."""
    try:
        from transformers.initialization import no_init_weights
        return no_init_weights()
    except ImportError:
        return contextlib.nullcontext()


class Skeleton:
    """The base's architecture with one decoder layer slot and no final norm or head: the base's
    embeddings, masks and rotary embeddings around whichever layer is loaded."""

    def __init__(self, *, base: Path, config, dtype: torch.dtype, device: torch.device):
        from transformers import AutoModelForCausalLM
        from ..common.quiet import quiet_transformers
        one = copy.deepcopy(config)
        one.num_hidden_layers = 1
        if isinstance(getattr(one, "layer_types", None), list):
            one.layer_types = one.layer_types[:1]
        with quiet_transformers(), _no_init():
            self.model = AutoModelForCausalLM.from_config(one, torch_dtype=dtype)
        embed = self.model.get_input_embeddings()
        m = open_model(Path(base), "base")
        try:
            name = next(n for n in m.index.tensors if n.endswith("embed_tokens.weight"))
            e = m.index.tensors[name]
            embed.weight.data.copy_(m.chunk(e, 0, e.numel).view(e.shape))
        finally:
            m.close()
        self.model.model.norm = torch.nn.Identity()
        self.model.lm_head = torch.nn.Identity()
        self.config = copy.deepcopy(config)      # each loaded layer takes the full model's settings for its index
        self.config._attn_implementation = self.model.config._attn_implementation
        self.dtype, self.device = dtype, device
        self.model.to(device).eval()

    @property
    def layer(self) -> torch.nn.Module:
        return self.model.model.layers[0]

    def load(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        """Layer `index` of the full model (its attention type, its index) with these weights."""
        with torch.device("meta"):           # no random initialisation of weights replaced at once
            layer = type(self.layer)(self.config, index)
        layer.load_state_dict(tensors, assign=True)
        self.model.model.layers[0] = layer.to(self.device, self.dtype).eval()

    @staticmethod
    def rename(name: str, index: int) -> str:
        return name.replace("model.layers.0.", f"model.layers.{index}.", 1)

    def inputs(self, run):
        """The layer slot's input on each batch (a generator): the embeddings' output, layer 0's input."""
        out = []

        def take(module, args, kwargs):
            out.append((args[0] if args else kwargs["hidden_states"]).detach().cpu())
            raise _Stop
        yield from self._taken(run(), self.layer.register_forward_pre_hook(take, with_kwargs=True), out)

    def fed(self, run, read):
        """run's batches, the layer slot fed batch k's cached activations `read(k)` in place of its input."""
        def feed(module, args, kwargs):
            h = read(feed.k).to(self.device, self.dtype)
            return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

        def batches():
            handle = self.layer.register_forward_pre_hook(feed, with_kwargs=True)
            try:
                for k, batch in enumerate(run()):
                    feed.k = k
                    yield batch
            finally:
                handle.remove()
        return batches

    def outputs(self, run, read):
        """The loaded layer's output on each batch's cached input (a generator)."""
        out = []

        def take(module, args, output):
            out.append((output[0] if isinstance(output, tuple) else output).detach().cpu())
            raise _Stop
        yield from self._taken(self.fed(run, read)(), self.layer.register_forward_hook(take), out)

    def _taken(self, batches, handle, out: list):
        """Each batch run until the hook behind `handle` takes its tensor into `out` (and stops the forward),
        that tensor yielded; the hook removed at the end."""
        try:
            for batch in batches:
                try:
                    self._forward(batch)
                except _Stop:
                    yield out.pop()
        finally:
            handle.remove()

    def _forward(self, batch: dict) -> None:
        with torch.no_grad():
            self.model(input_ids=batch["input_ids"].to(self.device),
                       attention_mask=batch["attention_mask"].to(self.device), use_cache=False)
