"""What tuning scores and how its scores are keyed.

A candidate is a merge recipe (method, parameters, per-tensor overrides, inputs). A score is one
lm-eval task's metric over a range of its validation examples (all of them, or a rung's share when
successive halving prunes), keyed by the sha256 of what fixes it: the recipe, the identity of every
input file (size, mtime, header digest) or of a plain model folder, the task and the range. So a
rerun, another study, the demo or Hi-Merging that meets the same (candidate, task, range) costs
nothing. Scores are normalised by each expert's score on its own domain, on the same examples
(MergeBench's NP).
"""
import hashlib
import json
from dataclasses import KW_ONLY, asdict, dataclass, field
from pathlib import Path

from .. import methods
from ..common.errors import BadParameter
from ..engine import api
from ..engine.inputs.index import TensorIndex
from ..engine.journal import input_identity
from ..engine.recipe.document import load_recipe
from ..engine.spec import MergeSpec, spec_from
from ..eval import domain_tasks, harness
from ..eval.domain_tasks import Task
from ..eval.tasks import tasks_digest
from ..library import complete, with_family


@dataclass(frozen=True)
class Validation:
    """How candidates are scored: domains[i] is expert i's own domain (its validation task)."""
    domains: tuple[str, ...]
    _: KW_ONLY
    family: str = domain_tasks.ZOO
    limit: int | None = None
    batch_size: int = 64
    device: str | None = "cpu"          # None: tune's choice (cuda when the trials hold GPUs, else cpu)

    def __post_init__(self):
        if self.limit is not None and self.limit < 1:
            raise BadParameter(f"--limit {self.limit}: tuning needs at least one validation example a task "
                               f"(leave --limit out for all of them)")

    def tasks(self, domain: str) -> tuple[Task, ...]:
        """The validation tasks of a domain (the zoo's split, or the family's surrogates)."""
        return self.plan([domain])[domain]

    def plan(self, domains=None) -> dict[str, tuple[Task, ...]]:
        """{domain: its validation tasks} of `domains` (default: all of ours); one line for a domain
        that is not one, or that has no validation task in the family."""
        try:
            return domain_tasks.plan(self.family, list(domains or self.domains), general=False, split="validation")
        except ValueError as e:
            raise BadParameter(f"--validate: {e}") from None

    def size(self, t: Task) -> int | None:
        """Validation examples of a task: all it has, at most `limit` (None: a group of tasks, no limit)."""
        n = harness.task_size(t)
        return self.limit if n is None else n if self.limit is None else min(n, self.limit)


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """One merge to score (picklable: a worker process, or another machine, can run it)."""
    method: str
    experts: tuple[str, ...]
    base: str | None = None
    params: dict = field(default_factory=dict)
    overrides: tuple = ()
    stats_folders: tuple[str, ...] | None = None    # data-aware methods: statistics folders, or
    data: tuple[str, ...] | None = None             # data sources to collect them from (cached)
    protocol: str | None = "mergebench"
    calibrate: str | None = None        # a post-step after the method (svc)
    recipe: str | None = None           # a mergekit recipe (YAML text) that is the merge (tune.layers: a
                                        # per-layer candidate); then params are empty, the protocol's kept
                                        # tensors stay kept

    def merge_spec(self, out: Path, **options) -> MergeSpec:
        """The candidate's merge into `out`, checked: a scratch merge (overwrite, no resume, quiet)
        unless options say otherwise."""
        options = {"overwrite": True, "resume": False, "progress": False, **options}
        if self.recipe is not None:
            kw = dict(load_recipe("the per-layer recipe", self.recipe)["merge"])
            keep = methods.protocol_defaults(methods.get(self.method), self.protocol).get("keep_base")
            return spec_from(kw.pop("method"), kw.pop("experts"), out, config=self.recipe, keep_base=keep, **kw,
                             **options)
        return spec_from(self.method, self.experts, out, base=self.base, params=dict(self.params),
                         protocol=self.protocol, calibrate=self.calibrate, stats_folders=self.stats_folders,
                         overrides=tuple(self.overrides), **options)

    def spec(self, out: Path, **options) -> MergeSpec:
        """merge_spec completed for the engine (the built-in family, statistics collected from `data`)."""
        return complete(self.merge_spec(out, **options), data=self.data)

    def sources(self):
        """(base, experts) as the engine resolves them (engine.api.sources)."""
        return api.sources(with_family(self.merge_spec(Path("unused"))))


def domain_np(scores: dict, references: dict, v: Validation) -> dict[str, float | None]:
    """{domain: score / its expert's own score on it}; None where the expert scores 0 (or either is
    not scored)."""
    return {d: scores[d] / references[d] if references.get(d) and scores.get(d) is not None else None
            for d in v.domains}


def normalised(scores: dict, references: dict, v: Validation) -> float | None:
    """MergeBench's NP: the mean of domain_np over the domains that have one; None when none has."""
    ratios = [r for r in domain_np(scores, references, v).values() if r is not None]
    return sum(ratios) / len(ratios) if ratios else None


def model_key(model) -> str:
    """What fixes a model's outputs: a Candidate's recipe without the references' spelling (a folder, a
    hub id or a domain name may name the same files) and its inputs' files; a plain folder's identity."""
    if not isinstance(model, Candidate):
        text = json.dumps(input_identity([TensorIndex.from_folder(Path(model))]), sort_keys=True, default=str)
        return "folder:" + hashlib.sha256(text.encode()).hexdigest()
    spec = model.merge_spec(Path("unused"))
    base, experts = model.sources()
    folders = [s.path for s in ([base] if base else []) + experts] + [Path(f) for f in (model.stats_folders or ())]
    text = json.dumps({"recipe": {k: x for k, x in spec.recipe().items() if k not in ("base", "experts")},
                       "protocol": model.protocol, "data": model.data,
                       **({"layered": model.recipe} if model.recipe is not None else {}),
                       "inputs": [input_identity([TensorIndex.from_folder(f)]) for f in folders]},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def task_identity(t: Task) -> list:
    """What fixes a task's scores: its name, metric, shots and, for a generated task, its files' digest
    (reads them all: compute it once a task, not once a key)."""
    return [t.name, t.metric, t.num_fewshot, tasks_digest(t.include) if t.include else None]


def score_key(model: str, v: Validation, task: list, start: int, stop: int) -> str:
    """The store's key of a model's score on a task (its task_identity) over examples start..stop-1
    under v's settings."""
    text = json.dumps({"model": model, "validation": {**asdict(v), "domains": None, "limit": None},
                       "task": task, "range": [start, stop]}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()
