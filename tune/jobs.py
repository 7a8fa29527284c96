"""One unit of tuning work, runnable in this process, a worker process or a Ray task on another
machine: merge a candidate into node-local scratch (or take a model folder as it is), score it on
ranges of validation examples, remove the merge. Plain data in, plain data out."""
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..common import VERSION
from ..engine import api
from ..eval import harness
from ..eval.domain_tasks import Task
from .score import Candidate, Validation

SCRATCH = "MBMERGE_SCRATCH"     # where a worker writes its merges (default: the system's temporary folder)


@dataclass(frozen=True, kw_only=True)
class Job:
    model: Candidate | str                      # a merge to make, or a model folder to score as it is
    requests: tuple[tuple[Task, int, int], ...]  # (task, start, stop): its examples start..stop-1
    v: Validation
    threads: int | None = None                  # torch threads in a worker (its share of the cores)


def run_job(job: Job) -> dict:
    """{"scores": one per request, "merge_seconds", "validation_seconds", "version"}; the merge's
    folder is deleted whatever happens."""
    if job.threads:
        import torch
        torch.set_num_threads(job.threads)
    tmp = Path(tempfile.mkdtemp(prefix="mbmerge-tune-", dir=os.environ.get(SCRATCH)))
    try:
        started = time.perf_counter()
        folder = job.model
        if isinstance(job.model, Candidate):
            folder = tmp / "merged"
            api.run(job.model.spec(folder, device=job.v.device))
        merged = time.perf_counter()
        scores = harness.evaluate_ranges(folder, job.requests, batch_size=job.v.batch_size, device=job.v.device,
                                         add_bos_token=harness.bos_token(job.v.family))
        return {"scores": scores, "merge_seconds": merged - started,
                "validation_seconds": time.perf_counter() - merged, "version": VERSION}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
