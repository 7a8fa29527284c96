"""How many of torch's intra-op threads a block of eager work on a model gets (collecting statistics,
evaluating, a whole-tensor method's SVDs), restored after the block: the thread discipline the merge's
element-wise chunks already have (engine/execute.py runs each on one thread).

Why: every eager op starts an OpenMP team whose threads spin waiting for each other, so the ops of
a small model, split over the cores, wait for the slowest; with another process on a core they wait
for it. Measured on this project's 2 cores, one fwd+bwd of a 1x40-token batch at 1 / 2 threads:
25k parameters 2.7 / 5.4 ms idle, 22 / 187 ms at load 7; 813k 8.0 / 7.0 ms idle, 71 / 1260 ms at
load 7; 25M 136 / 618 ms idle. So a thread gets at least PER_THREAD parameters of work.
"""
import contextlib

PER_THREAD = 50_000_000


def threads_for(parameters: int) -> int:
    """Threads for eager work on a model of this many parameters: one per PER_THREAD, at least one,
    at most torch's default (the cores it may use)."""
    import torch
    return max(1, min(torch.get_num_threads(), parameters // PER_THREAD))


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads are `n` inside the block, and what they were again after."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def model_threads(model):
    """torch_threads(threads_for(the model's parameter count)) for a torch module."""
    return torch_threads(threads_for(sum(p.numel() for p in model.parameters())))


@contextlib.contextmanager
def held_to(n: int | None):
    """Inside the block, this thread (and the threads it starts: the merge's pools, the writer) runs on the first
    `n` cores the process may use, and torch's intra-op threads are `n`; None: as they are. The compiled loops and
    the chunk pools size themselves from the cores allowed (kernels/cpu.py threads())."""
    import os
    if n is None or not hasattr(os, "sched_setaffinity"):
        yield
        return
    allowed = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, allowed[:n])
    try:
        with torch_threads(min(n, len(allowed))):
            yield
    finally:
        os.sched_setaffinity(0, allowed)
