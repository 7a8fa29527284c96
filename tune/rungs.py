"""Validation scores of models on growing shares of the validation examples, through the score store.

Each task's examples are cut at fixed fractions (all of them: one range; successive halving: 1/9,
1/3, 1). A model's score on a domain at rung r is, per task, the example-weighted mean of its range
scores up to r (exact for lm-eval's per-example means, which every zoo and MergeBench validation
metric is but ifeval's instruction-level accuracy), averaged over the domain's tasks. Ranges not in
the store are scored by jobs (one a model: merged once, all its missing ranges) on a runner.

The store keeps a score per range, not per example, so a range is reused only as a whole: `pieces`
cuts every per-example-mean task at more fractions than the rungs need (tune.search: halving's, in
every study), so that an unpruned study stores the very pieces a halving study asks for, and the
other way round; a task whose score is not a mean over its examples is cut at its rungs only.
"""
import math
from dataclasses import dataclass

from ..common.errors import BadParameter
from ..eval.domain_tasks import Task
from .database import ScoreStore
from .jobs import Job
from .score import Validation, model_key, score_key, task_identity

ALL = (1.0,)


class JobFailed(Exception):
    """A job that did not come back (its worker died, retries spent)."""


@dataclass(kw_only=True)
class Scored:
    """One model's scores at a rung: {domain: score}, and what its ranges up to the rung cost."""
    scores: dict
    examples: int = 0            # validation examples behind the scores (stored or evaluated now)
    evaluated: int = 0           # of which evaluated in this call
    merge_seconds: float = 0.0
    validation_seconds: float = 0.0
    error: str | None = None


class Evaluator:
    """Scores of models on ranges of validation examples: from the store, or scored by jobs on a runner."""

    def __init__(self, *, store: ScoreStore, v: Validation, runner, fractions=ALL, pieces=(), extra=None):
        """extra: {name: tasks} scored besides v's domains (an objective's: tune.objectives)."""
        self.store, self.v, self.runner, self.fractions = store, v, runner, tuple(fractions)
        self._tasks = {**{d: v.tasks(d) for d in v.domains}, **(extra or {})}
        sizes = {t: v.size(t) for ts in self._tasks.values() for t in ts}
        self._bounds = {t: bounds(t, n, self.fractions, pieces) for t, n in sizes.items()}
        # rung r of task t: its pieces up to cut point _ends[t][r]
        self._ends = {t: [1] if n is None else [self._bounds[t].index(cut(n, f)) for f in self.fractions]
                      for t, n in sizes.items()}
        self._task_ids = {t: task_identity(t) for t in self._bounds}
        self._keys = {}

    @property
    def rungs(self) -> int:
        return len(self.fractions)

    def ranges(self, domains, rung: int):
        """(task, start, stop) of `domains` up to rung `rung` (non-empty ranges only)."""
        b = self._bounds
        return [(t, b[t][i], b[t][i + 1]) for d in domains for t in self._tasks[d] for i in range(self._ends[t][rung])]

    def score(self, models: list, domains: list[list[str]], rung: int = -1) -> list[Scored]:
        """Scored of each model (a Candidate, or a folder) on its domains up to `rung` (default: all
        examples); missing ranges are scored now, by jobs on the runner; a job that did not come back
        leaves its model with an error."""
        rung = rung % self.rungs
        wanted = [[(r, self._key(m, *r)) for r in self.ranges(ds, rung)] for m, ds in zip(models, domains)]
        found = self.store.get(k for w in wanted for _, k in w)
        jobs, owners = [], []
        for i, (m, w) in enumerate(zip(models, wanted)):
            missing = [(r, k) for r, k in w if k not in found]
            if missing:
                jobs.append(Job(model=m, requests=tuple(r for r, _ in missing), v=self.v))
                owners.append((i, missing))
        errors, evaluated = {}, [0] * len(models)
        for j, result in self.runner.map(jobs):
            i, missing = owners[j]
            if isinstance(result, Exception):
                errors[i] = str(result)
                continue
            new = entries(missing, result)
            self.store.put(new)
            found.update(new)
            evaluated[i] = sum(e["examples"] for e in new.values())
        return [Scored(scores={}, error=errors[i]) if i in errors else
                _combine(ds, [(r, found[k]) for r, k in w], evaluated[i], self._tasks)
                for i, (ds, w) in enumerate(zip(domains, wanted))]

    def _key(self, model, t, start, stop) -> str:
        mk = self._keys.get(id(model))
        if mk is None:
            mk = self._keys[id(model)] = (model, model_key(model))   # keep the model alive: id() stays unique
        return score_key(mk[1], self.v, self._task_ids[t], start, stop)


def bounds(t: Task, size: int | None, fractions, pieces=()) -> list:
    """The cut points of a task's examples, increasing: 0 and cut(size, f) for each fraction and, for a
    task scored as a mean over its examples, each of `pieces` ([0, None], all of them, for a group of
    tasks, which cannot be cut)."""
    if size is None:
        if tuple(fractions) != ALL:
            raise BadParameter(f"--prune halving cuts tasks into ranges of examples; {t.name} is a group of tasks")
        return [0, None]
    shares = {*fractions, *(pieces if mean_over_examples(t) else ())}
    return sorted({0, *(cut(size, f) for f in shares)})


def cut(size: int, f: float) -> int:
    """Where the first share f of `size` examples ends."""
    return min(size, math.ceil(size * f - 1e-9))


def mean_over_examples(t: Task) -> bool:
    """Whether a task's score on a range is the mean of one value per example, so that its pieces
    combine exactly; not ifeval's instruction-level accuracies (a mean over instructions, several an
    example)."""
    return not t.metric.startswith("inst_level")


def entries(ranges, result: dict) -> dict[str, dict]:
    """A job's results as store entries, each with its share of the merge (per range) and of the
    validation time (per example)."""
    sizes = [(stop or 0) - start for (_, start, stop), _ in ranges]     # a group's all: counted as 0
    total = sum(sizes)
    return {k: {"score": s, "examples": n, "merge_seconds": result["merge_seconds"] / len(ranges),
                "validation_seconds": result["validation_seconds"] * (n / total if total else 1 / len(ranges))}
            for ((_, k), s, n) in zip(ranges, result["scores"], sizes)}


def _combine(domains, found, evaluated, tasks) -> Scored:
    """Domain scores from range entries: per task the example-weighted mean, per domain the mean of
    its tasks (tasks with no score left out; None when none has one)."""
    by_task = {}
    for (t, _, _), e in found:
        if e["score"] is not None:
            n, total = by_task.get(t, (0, 0.0))
            w = e["examples"] or 1      # a group of tasks' one all-examples range, counted as 0 examples
            by_task[t] = (n + w, total + e["score"] * w)
    scores = {}
    for d in domains:
        vals = [by_task[t][1] / by_task[t][0] for t in tasks[d] if t in by_task]
        scores[d] = sum(vals) / len(vals) if vals else None
    return Scored(scores=scores, examples=sum(e["examples"] for _, e in found), evaluated=evaluated,
                  merge_seconds=sum(e["merge_seconds"] for _, e in found),
                  validation_seconds=sum(e["validation_seconds"] for _, e in found))
