"""Diagonal Fisher information of one model on data (for Fisher merging).

    F = (1/N) sum_b g_b ** 2,    g_b = d/dtheta  sum_{t : labels_t != -100} log p(y_t | x_<t)

b runs over the batches, N is the number of examples; with batches of one example (what the
caller uses) this is the exact per-example Fisher. The prefix x_<t is always the gold input
(teacher forcing); only the target token y_t changes with `labels`:
  "empirical"  y_t = labels_t, the gold token;
  "sampled"    y_t ~ p(. | x_<t), the model's own distribution, by inverse-CDF sampling:
               u ~ U[0, 1) from torch.rand(n_targets, generator=torch.Generator().manual_seed(seed))
               (a CPU generator, re-seeded at the start of every pass and drawn once per batch in
               row-major (example, position) order), then y_t = the first token whose cumulative
               probability exceeds u * (total probability). The uniforms come from the CPU so the
               draw is the same on any device up to the rounding of the probabilities.

Nothing is trained: eval mode, no optimizer, parameters untouched. Parameters are measured in
memory groups (groups.py), one data pass each; within a pass only that group requires grad, and
each parameter's gradient is squared into its float32 accumulator and freed the moment autograd
has it, so at most one parameter's gradient exists at a time.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from ..common.errors import BadParameter
from .groups import Tally, device_of, measuring, on_device, pick, plan_groups

LABELS = ("sampled", "empirical")


def fisher(model: torch.nn.Module, batches: Callable[[], Iterable[dict]], *,
           names: list[str] | None = None, labels: str = "sampled", seed: int = 0,
           budget: int = 4 << 30, emit: Callable[[str, torch.Tensor], None]) -> dict:
    """Diagonal Fisher of `model` on `batches()` for each parameter in `names` (default: all).

    Args:
        batches: a zero-argument callable returning a fresh iterator of batches (input_ids,
            attention_mask, labels; CPU tensors). Called once per memory group.
        labels: "sampled" (y from the model) or "empirical" (gold y); see the module docstring.
        budget: bytes of float32 accumulators per pass.
        emit: called as emit(name, F) with F float32 on the CPU, the parameter's shape, as soon
            as the parameter's group is done.
    Returns:
        {"examples": N, "tokens": target tokens per pass, "passes": groups, "seconds": wall time}
    """
    if labels not in LABELS:
        raise BadParameter(f"fisher labels must be one of {', '.join(LABELS)}, not {labels!r}")
    params = dict(model.named_parameters())
    names = pick(list(params), names, "fisher")
    device, tally = device_of(model), Tally()
    with measuring(model), torch.enable_grad():
        for group in plan_groups([(n, params[n].numel() * 4) for n in names], budget):
            acc = _one_pass(model, batches, {n: params[n] for n in group}, labels, seed, device, tally)
            for n in group:
                emit(n, (acc.pop(n) / tally.examples).cpu())
    return tally.info()


def _one_pass(model, batches, group: dict[str, torch.nn.Parameter], labels, seed, device, tally):
    """One pass over the data accumulating sum_b g_b**2 for the parameters of `group`."""
    acc = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in group.items()}
    for p in group.values():
        p.grad = None                 # a stale .grad would be summed into the first g
        p.requires_grad_(True)        # (hooks can only be registered on tensors that need grad)
    hooks = [p.register_post_accumulate_grad_hook(_fold_into(acc[n])) for n, p in group.items()]
    gen = torch.Generator().manual_seed(seed)     # same seed every pass: every group sees the same y
    try:
        for batch in on_device(batches, device):
            ll, n_targets = log_likelihood(model, batch, labels, gen)
            if ll.requires_grad:      # no target token, or no path to this group: g = 0
                ll.backward()
            tally.add(batch["input_ids"].shape[0], n_targets)
        tally.end_pass()
    finally:
        for h in hooks:
            h.remove()
        for p in group.values():
            p.requires_grad_(False)
            p.grad = None
    return acc


def _fold_into(a: torch.Tensor):
    def hook(p: torch.Tensor):
        a.add_(p.grad.float().square())   # g**2 in float32, whatever the model's dtype
        p.grad = None                     # freed now: the full gradient never coexists
    return hook


def log_likelihood(model, batch: dict, labels: str, gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """sum_t log p(y_t | x_<t) over the batch's target positions, and how many there are."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   use_cache=False).logits                          # [B, T, V]
    target = batch["labels"][:, 1:] != -100                         # [B, T-1]: logits at t predict t+1
    z = logits[:, :-1][target].float()                              # [n, V]
    y = batch["labels"][:, 1:][target] if labels == "empirical" else sample(z.detach(), gen)
    return -F.cross_entropy(z, y, reduction="sum"), int(target.sum())


def sample(z: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One draw per row from softmax(z) by inverse CDF, uniforms from the CPU generator `gen`."""
    u = torch.rand(z.shape[0], generator=gen).to(z.device)         # [n]
    c = torch.softmax(z, dim=-1).cumsum(dim=-1)                     # [n, V]
    y = torch.searchsorted(c, (u * c[:, -1]).unsqueeze(-1), right=True)   # [n, 1]
    return y.squeeze(-1).clamp_(max=z.shape[-1] - 1)   # clamp: u * c[-1] can round up to c[-1]
