"""RegMean++ statistics (MergeBench's regmean_plusplus): each expert's Grams taken on its data as the
*merged* model carries it to each layer, layers below already merged. Collected for all experts at
once, layer by layer, merging each layer as it goes (the same RegMean the engine then runs):

    h_t^0     = the base's embedding output on task t's data (the merged model keeps the base's embeddings)
    G_t^l     = X^T X / tokens at every linear of expert t's layer l, run on h_t^l   (gram.gram)
    W^l       = RegMean of the experts' layer l with the G^l (norms and biases averaged)
    h_t^l+1   = the merged layer l on h_t^l

One decoder layer runs at a time, in a skeleton of the base's architecture with a single layer slot
(and no final norm or head): a pre-hook hands it the cached h, a hook takes its output. Memory: one
layer of each expert, the merged layer and one batch of activations; between layers the activations
of every task wait on disk, one safetensors file per batch. Cost against RegMean, which runs each
expert's model once over its data: twice the layer forwards (the expert's layer and the merged one),
the activations written and read again at every layer, and each layer merged twice (here, to carry
the activations on; in the engine, which writes the output from these Grams).
"""
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from ..engine.inputs.quantized import open_model
from ..engine.inputs.read import MappedModel
from ..methods import merge_tensors
from .gram import gram
from .skeleton import Skeleton, layer_tensors


@dataclass(frozen=True, kw_only=True)
class ExpertData:
    """One expert t of a RegMean++ collection: its folder, its data (a callable giving fresh batch
    iterators) and where its Grams go, emit(name, G)."""
    folder: Path
    batches: Callable
    emit: Callable[[str, torch.Tensor], None]


def collect_plusplus(base: Path, experts: list[ExpertData], *, reduction: float, dtype: torch.dtype,
                     device: torch.device, budget: int, progress: bool = True) -> dict:
    """RegMean++ Grams of every expert on its data, emitted layer by layer; returns what a card records."""
    from transformers import AutoConfig
    started = time.perf_counter()
    config = AutoConfig.from_pretrained(base)
    models = [open_model(e.folder, f"expert {e.folder}") for e in experts]
    batches = [e.batches for e in experts]
    slot = Skeleton(base=base, config=config, dtype=dtype, device=device)
    try:
        with tempfile.TemporaryDirectory(prefix="mbmerge-regmean++-") as tmp:
            cache = ActivationCache(Path(tmp))
            for t, run in enumerate(batches):                 # h_t^0: the embeddings as the base computes them
                cache.write(t, 0, slot.inputs(run))
            for layer in range(config.num_hidden_layers):
                if progress:
                    print(f"mbmerge stats: regmean_plusplus layer {layer + 1}/{config.num_hidden_layers}",
                          file=sys.stderr, flush=True)
                grams = []
                for t, (m, run) in enumerate(zip(models, batches)):
                    slot.load(layer, layer_tensors(m, layer))
                    found = {}
                    gram(slot.model, slot.fed(run, cache.reader(t, layer)), budget=budget,
                         emit=lambda n, g, found=found: found.__setitem__(slot.rename(n, layer), g))
                    for n, g in found.items():
                        experts[t].emit(n, g)
                    grams.append(found)
                slot.load(layer, _merged(models, layer, grams, reduction))
                for t, run in enumerate(batches):
                    cache.write(t, layer + 1, slot.outputs(run, cache.reader(t, layer)))
    finally:
        for m in models:
            m.close()
    return {"layers": config.num_hidden_layers, "seconds": round(time.perf_counter() - started, 3)}


def _merged(models: list[MappedModel], layer: int, grams: list[dict], reduction: float) -> dict[str, torch.Tensor]:
    """Layer `layer` merged by RegMean with this layer's Grams, as the engine merges it from them."""
    prefix = f"model.layers.{layer}."
    weights = [layer_tensors(m, layer) for m in models]
    return {n: merge_tensors("regmean", None, [w[n] for w in weights], reduction=reduction,
                             stat=[g.get(prefix + n) for g in grams]).float() for n in weights[0]}


class ActivationCache:
    """Each task's activations at one layer's input, a safetensors file per batch."""

    def __init__(self, folder: Path):
        self.folder = folder

    def write(self, task: int, layer: int, hs) -> None:
        for k, h in enumerate(hs):
            save_file({"h": h.contiguous()}, str(self.folder / f"t{task}-l{layer % 2}-b{k}.safetensors"))

    def reader(self, task: int, layer: int):
        """A callable giving batch k's activations at `layer`'s input."""
        return lambda k: load_file(str(self.folder / f"t{task}-l{layer % 2}-b{k}.safetensors"))["h"]
