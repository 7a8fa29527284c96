"""RegMean Gram matrices of one model on data.

For every measured nn.Linear (y = x W^T + bias), the Gram matrix of its input over the data:

    G = X^T X / n,    X = [n, in], the layer's input rows at the real tokens (attention_mask == 1)

n is counted per layer; padding never enters. Forward hooks capture X; nothing needs gradients.
Accumulators are float32 on the layer's device; layers are measured in memory groups
(groups.py) of in*in*4 bytes each, one forward pass over the data per group.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from ..common.errors import BadModel, BadParameter
from .groups import Tally, device_of, measuring, on_device, pick, plan_groups


def gram(model: torch.nn.Module, batches: Callable[[], Iterable[dict]], *,
         names: list[str] | None = None, budget: int = 4 << 30,
         emit: Callable[[str, torch.Tensor], None]) -> dict:
    """Input Gram matrix of each nn.Linear of `model` on `batches()`.

    Args:
        batches: a zero-argument callable returning a fresh iterator of batches (input_ids,
            attention_mask; CPU tensors). Called once per memory group.
        names: "<module>.weight" names of the Linear layers to measure (default: every Linear
            but the output head, which RegMean never merges).
        budget: bytes of float32 accumulators per pass.
        emit: called as emit("<module>.weight", G) with G float32 [in, in] on the CPU as soon as
            the layer's group is done.
    Returns:
        {"examples", "tokens": real tokens per pass, "passes": groups, "seconds": wall time}
    """
    linears = {f"{m}.weight": mod for m, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = pick(list(linears), names, "gram") if names is not None else \
        [n for n, mod in linears.items() if mod is not head]
    device, tally = device_of(model), Tally()
    with measuring(model), torch.no_grad():
        for group in plan_groups([(n, linears[n].in_features ** 2 * 4) for n in names], budget):
            G, count = _one_pass(model, batches, {n: linears[n] for n in group}, device, tally)
            for n in group:
                if count[n] == 0:
                    raise BadParameter(f"gram: layer {n} never saw a real token (it did not run on "
                                       f"the data); leave it out of names")
                emit(n, (G.pop(n) / count[n]).cpu())
    return tally.info()


def _one_pass(model, batches, group: dict[str, torch.nn.Linear], device, tally):
    """One forward pass over the data accumulating X^T X and n for the layers of `group`."""
    G = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float32, device=m.weight.device)
         for n, m in group.items()}
    count = dict.fromkeys(group, 0)
    now = {}                                      # the running batch's real-token mask, for the hooks

    def capture(n):
        def hook(module, args, output):
            x = args[0]
            real = now["real"]                                            # [B*T] bool
            if x.shape[:-1].numel() != real.numel():
                raise BadModel(f"gram: the input of {n} has shape {list(x.shape)}, not one row per "
                               f"token of the batch {list(now['shape'])}; this layer cannot be measured")
            x = x.reshape(-1, x.shape[-1])[real.to(x.device)].float()    # [n, in]
            G[n].addmm_(x.T, x)                                           # += X^T X
            count[n] += x.shape[0]
        return hook

    hooks = [m.register_forward_hook(capture(n)) for n, m in group.items()]
    try:
        for batch in on_device(batches, device):
            mask = batch["attention_mask"]
            now.update(real=mask.reshape(-1).bool(), shape=mask.shape)
            model(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False)
            tally.add(mask.shape[0], int(mask.sum()))
        tally.end_pass()
    finally:
        for h in hooks:
            h.remove()
    return G, count
