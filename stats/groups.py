"""Memory groups and the plumbing shared by the collectors (fisher.py, gram.py).

A collector keeps one float32 accumulator per tensor it measures. For a 9B model these do not all
fit beside the weights, so the tensors are cut into consecutive groups whose accumulators fit a
byte budget, and the data is run once per group: memory is bounded by the budget, time grows with
the number of groups. This module knows nothing about what is accumulated.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch

from ..common.errors import BadParameter


def plan_groups(items: list[tuple[str, int]], budget: int) -> list[list[str]]:
    """Cut (name, accumulator bytes) items, in order, into consecutive groups of at most `budget`
    bytes; an item larger than the budget is a group alone.

    Example: plan_groups([("a", 3), ("b", 3), ("c", 9), ("d", 1)], 6) -> [["a", "b"], ["c"], ["d"]]
    """
    groups: list[list[str]] = []
    used = budget + 1                 # forces a new group for the first item
    for name, nbytes in items:
        if groups and used + nbytes <= budget:
            groups[-1].append(name)
            used += nbytes
        else:
            groups.append([name])
            used = nbytes
    return groups


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def on_device(batches: Callable[[], Iterable[dict]], device: torch.device) -> Iterator[dict]:
    """One fresh pass over the data, every tensor moved to the model's device."""
    for batch in batches():
        yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def pick(available: list[str], names: list[str] | None, what: str) -> list[str]:
    """`names` (default: all of `available`) in model order; unknown names are an error."""
    if names is None:
        return list(available)
    unknown = sorted(set(names) - set(available))
    if unknown:
        raise BadParameter(f"{what}: no such tensor in the model: {', '.join(unknown[:5])}"
                           f"{' ...' if len(unknown) > 5 else ''} (names are model.named_parameters() keys)")
    wanted = set(names)
    return [n for n in available if n in wanted]


@contextmanager
def measuring(model: torch.nn.Module):
    """Eval mode (no dropout) with every parameter frozen; the caller unfreezes what it needs.
    Training mode and requires_grad flags are restored on exit, also on errors."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)


class Tally:
    """Examples and tokens seen per pass; every pass must see the same data (each memory group
    re-reads it), so a `batches` callable that changes between passes is caught here."""

    def __init__(self):
        self.start, self.passes, self.first, self.now = time.perf_counter(), 0, None, [0, 0]

    def add(self, examples: int, tokens: int):
        self.now[0] += examples
        self.now[1] += tokens

    def end_pass(self):
        seen = tuple(self.now)
        if self.first is None:
            self.first = seen
        elif seen != self.first:
            raise BadParameter(f"the data changed between passes ({self.first[0]} examples, "
                               f"{self.first[1]} tokens, then {seen[0]}, {seen[1]}): `batches` must "
                               f"return the same batches every time it is called")
        if seen[0] == 0:
            raise BadParameter("no examples: the data source yielded no batches")
        self.passes, self.now = self.passes + 1, [0, 0]

    @property
    def examples(self) -> int:
        return self.first[0]

    def info(self) -> dict:
        examples, tokens = self.first or (0, 0)       # (0, 0): nothing was asked for, no pass ran
        return {"examples": examples, "tokens": tokens, "passes": self.passes,
                "seconds": time.perf_counter() - self.start}
