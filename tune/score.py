"""Scoring candidate merges on validation data, with a cache keyed by what fixes a merge's bytes.

A candidate is a merge recipe (method, parameters, per-tensor overrides, inputs). Its key is the
sha256 of the recipe, the identity of every input file (size, mtime, header digest) and the
validation settings, one entry per domain, so a rerun, or another search that meets the same
candidate, costs nothing, and a domain scored once is never scored again. The merge is written to
a temporary folder, scored, and deleted; scores are validation scores through the eval layer
(lm-eval), normalised by each expert's score on its own domain (MergeBench's NP).
"""
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..common.cache import cache_dir
from ..engine import api
from ..engine.index import TensorIndex
from ..engine.journal import input_identity
from ..engine.spec import MergeSpec
from ..eval import harness, registry
from ..eval.tasks import tasks_digest
from ..stats.prepare import complete, with_family


@dataclass(frozen=True)
class Validation:
    """How candidates are scored: domains[i] is expert i's own domain (its validation task)."""
    domains: tuple[str, ...]
    family: str = registry.ZOO
    limit: int | None = None
    batch_size: int = 64
    device: str = "cpu"


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

    def merge_spec(self, out: Path, **options) -> MergeSpec:
        """The candidate's merge into `out`, checked: a scratch merge (overwrite, no resume, quiet)
        unless options say otherwise."""
        options = {"overwrite": True, "resume": False, "progress": False, **options}
        return MergeSpec(method=self.method, experts=self.experts, out=out, base=self.base, params=dict(self.params),
                         protocol=self.protocol, stats_folders=self.stats_folders, data=self.data,
                         overrides=tuple(self.overrides), **options)

    def spec(self, out: Path, **options) -> MergeSpec:
        """merge_spec completed for the engine (the built-in family, statistics collected)."""
        return complete(self.merge_spec(out, **options))

    def sources(self):
        """(base, experts) as the engine resolves them (engine.api.sources)."""
        return api.sources(with_family(self.merge_spec(Path("unused"))))


def validation_scores(folder, v: Validation, domains, cache: bool = False) -> dict[str, float | None]:
    """{domain: validation score} of the model in `folder` (the eval layer's score cache when `cache`)."""
    plan = registry.plan(v.family, list(domains), general=False, split="validation")
    ts = harness.evaluate_tasks(folder, [t for group in plan.values() for t in group], limit=v.limit,
                                batch_size=v.batch_size, device=v.device, add_bos_token=harness.bos_token(v.family),
                                cache=cache)
    return harness.domain_scores(plan, ts)


def normalised(scores: dict, references: list[float | None], v: Validation) -> float | None:
    """Mean over experts i of score[domains[i]] / expert i's own score (MergeBench's NP)."""
    ratios = [scores.get(d) / r for d, r in zip(v.domains, references) if r and scores.get(d) is not None]
    return sum(ratios) / len(ratios) if ratios else None


def keys(c: Candidate, v: Validation, domains) -> dict[str, str]:
    """{domain: the cache key of candidate c scored on it}: the recipe without the references'
    spelling (a folder, a hub id or a domain name may name the same files), each input's files in
    order, the validation settings and the domain's tasks. Inputs are read once for all domains."""
    spec = c.merge_spec(Path("unused"))
    base, experts = c.sources()
    folders = [s.path for s in ([base] if base else []) + experts] + [Path(f) for f in (c.stats_folders or ())]
    common = {"recipe": {k: x for k, x in spec.recipe().items() if k not in ("base", "experts")},
              "protocol": c.protocol, "data": c.data,
              "inputs": [input_identity([TensorIndex.from_folder(f)]) for f in folders]}
    out = {}
    for d in domains:
        text = json.dumps({**common, "validation": {**asdict(v), "domains": None, "domain": d},
                           "tasks": _task_digest(v, d)}, sort_keys=True, default=str)
        out[d] = hashlib.sha256(text.encode()).hexdigest()
    return out


def _task_digest(v: Validation, domain: str) -> list:
    plan = registry.plan(v.family, [domain], general=False, split="validation")
    return [(t.name, t.metric, t.num_fewshot, tasks_digest(t.include) if t.include else None) for t in plan[domain]]


def run(c: Candidate, v: Validation, domains) -> dict:
    """Merge c into a temporary folder and score it on `domains`: {"scores", "merge_seconds",
    "validation_seconds"}. The folder is deleted whatever happens."""
    tmp = Path(tempfile.mkdtemp(prefix="mbmerge-tune-"))
    try:
        started = time.perf_counter()
        api.run(c.spec(tmp / "merged"))
        merged = time.perf_counter()
        scores = validation_scores(tmp / "merged", v, domains)
        return {"scores": scores, "merge_seconds": merged - started,
                "validation_seconds": time.perf_counter() - merged}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class ScoreCache:
    """{key: {"score", "merge_seconds", "validation_seconds"}} in one JSON file, read once and re-read
    before each write (another search may have added to it), under a file lock so that writers in
    other processes do not overwrite each other's entries."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path else cache_dir() / "tune-scores.json"
        self.data = self._load()

    def _load(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def lookup(self, c: Candidate, v: Validation, domains) -> tuple[dict, dict]:
        """({domain: key}, {domain: cached entry or None}) of candidate c."""
        found = keys(c, v, domains)
        return found, {d: self.data.get(k) for d, k in found.items()}

    def store(self, keys: dict, result: dict) -> dict:
        """Cache a run's scores, one entry per domain with its share of the validation time; returns
        the entries by domain."""
        share = result["validation_seconds"] / len(result["scores"])
        entries = {d: {"score": s, "merge_seconds": result["merge_seconds"], "validation_seconds": share}
                   for d, s in result["scores"].items()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked():    # another search's store between our read and our replace would be lost
            self.data = {**self._load(), **{keys[d]: e for d, e in entries.items()}}
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
            os.replace(tmp, self.path)     # readers, who take no lock, see the old file or the new one
        return entries

    @contextlib.contextmanager
    def _locked(self):
        """An exclusive lock on a file beside the cache (not the cache itself, which os.replace swaps
        for a new file), held by one writer at a time, across processes; released if it dies."""
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
