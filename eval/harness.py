"""Run lm-eval (its Python API, model "hf") on a local model folder and return one number per task
and per domain. Scores are cached per (model identity, task, metric, shots, limit, chat template,
generated-task digest, lm-eval version) in a SQLite file (ScoreCache), so a base's or expert's
scores are computed once, whichever process computed them.

Model identity: sha256 of mbmerge.json plus its mtime when the folder has one (a merge records the
digests of its shards there), else sha256 of the weight files (memoised by path, size and mtime).
Knows nothing of normalised performance or forgetting (eval.metrics) nor of the zoo's checkers.
"""
import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..common.progress import Progress
from ..common.threads import model_threads
from ..engine.output.verify import file_sha256
from . import domain_tasks
from .domain_tasks import Task

CODE_EVAL = "HF_ALLOW_CODE_EVAL"


@dataclass(frozen=True, kw_only=True)
class EvalSettings:
    """How lm-eval scores a model (`mbmerge eval`'s and the demo's flags).

    limit: lm-eval's --limit (examples per task; a float < 1 is a fraction; None: all). batch_size,
    device, dtype: the HF model's. chat_template: apply the tokenizer's chat template (MergeBench: off).
    verbose: let lm-eval's logging, progress bars and git errors through (lm_eval_output).
    """
    limit: int | float | None = None
    batch_size: int = 8
    device: str = "cpu"
    chat_template: bool = False
    dtype: str = "auto"
    verbose: bool = False


def cache_file() -> Path:
    from ..common.cache import cache_dir
    return cache_dir() / "eval-scores.db"


class ScoreCache:
    """{key: JSON value} in a SQLite file (Python's own sqlite3): scores under their task keys, weight
    digests under "weights:" keys. Rows are inserted one transaction a batch and never rewritten, so
    processes evaluating at once (demo --ray) keep each other's entries."""

    def __init__(self, path: Path):
        import sqlite3
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, timeout=60)
        with self.db:
            self.db.execute("create table if not exists cache (key text primary key, value text not null)")

    def get(self, keys) -> dict:
        keys, out = list(keys), {}
        for i in range(0, len(keys), 500):     # SQLite's limit on bound parameters
            part = keys[i:i + 500]
            rows = self.db.execute(f"select key, value from cache where key in ({','.join('?' * len(part))})", part)
            out.update({k: json.loads(v) for k, v in rows})
        return out

    def prefixed(self, prefix: str) -> dict:
        rows = self.db.execute("select key, value from cache where key >= ? and key < ?", (prefix, prefix + "\uffff"))
        return {k[len(prefix):]: json.loads(v) for k, v in rows}

    def put(self, entries: dict) -> None:
        with self.db:
            self.db.executemany("insert or ignore into cache values (?, ?)",
                                [(k, json.dumps(v)) for k, v in entries.items()])

    def close(self):
        self.db.close()


def model_identity(folder, memo: dict | None = None) -> str:
    """A digest naming the model in `folder`: mbmerge.json's sha256 + mtime, else its weights' sha256."""
    folder = Path(folder).resolve()
    record = folder / "mbmerge.json"
    if record.exists():
        return "mbmerge:" + file_sha256(record) + f":{record.stat().st_mtime_ns}"
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        from ..common.errors import BadModel
        raise BadModel(f"{folder}: no *.safetensors weights to evaluate (is it a model folder?)")
    memo = {} if memo is None else memo
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        key = f"{f}|{st.st_size}|{st.st_mtime_ns}"
        if key not in memo:
            memo[key] = file_sha256(f)
        h.update(f"{f.name}:{memo[key]}\n".encode())
    return "weights:" + h.hexdigest()


def _task_key(identity: str, t: Task, limit, chat_template: bool, add_bos_token, digests: dict) -> str:
    import lm_eval
    parts = {"model": identity, "task": t.name, "metric": t.metric, "shots": t.num_fewshot, "limit": limit,
             "chat": chat_template, "bos": add_bos_token, "tasks": digests.get(t.include),
             "lm_eval": lm_eval.__version__}
    return json.dumps(parts, sort_keys=True)


def _pick(result: dict, metric: str, task: str):
    """The metric from one task's lm-eval results ('acc,none'); the same metric under another filter
    when the exact key is absent."""
    if metric in result:
        return result[metric]
    name = metric.split(",")[0]
    for key, value in result.items():
        if key.split(",")[0] == name:
            return value
    raise KeyError(f"lm-eval result of {task} has no metric {metric!r} (has {sorted(result)})")


@contextlib.contextmanager
def _replaced(owner, name: str, value):
    """owner.name is value inside the block, and what it was again after."""
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


@contextlib.contextmanager
def lm_eval_output(verbose: bool = False):
    """lm-eval's own output while it scores, off unless `verbose` (restored afterwards): its logger
    (a warning per task and call, such as 'Overwriting default num_fewshot'), the `git describe` it
    runs to record a commit hash in results we do not keep (outside a git repository: 'fatal: not
    a git repository' on the terminal), transformers' warnings, and the progress bars of lm-eval,
    transformers and datasets (carriage returns in piped logs), all written to sys.stderr."""
    if verbose:
        yield
        return
    import lm_eval.evaluator
    from ..common.quiet import quiet_transformers
    logger = logging.getLogger("lm_eval")
    level = logger.level
    with contextlib.ExitStack() as stack:
        logger.setLevel(logging.ERROR)
        stack.callback(logger.setLevel, level)
        stack.enter_context(_replaced(lm_eval.evaluator, "get_git_commit_hash", lambda: None))
        stack.enter_context(quiet_transformers())
        stack.enter_context(contextlib.redirect_stderr(stack.enter_context(open(os.devnull, "w"))))
        yield


def evaluate_tasks(model_dir, tasks, *, settings: EvalSettings = EvalSettings(), add_bos_token: bool | None = None,
                   cache: bool | Path = True, progress=None) -> dict[str, float | None]:
    """{task name: score} for lm-eval tasks on the model in `model_dir`, from the cache when there.

    Args:
        tasks: domain_tasks.Task objects. Tasks that execute code are skipped (None) unless
            HF_ALLOW_CODE_EVAL=1.
        settings: how lm-eval runs (EvalSettings: limit, batch size, device, chat template, ...).
        add_bos_token: None keeps lm-eval's default (no BOS except Gemma); the zoo was trained with <s>.
        cache: True (the default file), a path (a SQLite file: ScoreCache), or False.
        progress: called as progress(what, timed) once a task, scored ("math", True), found in the
            cache ("math (cached)", False) or skipped; each task then runs in an lm-eval call of its own.

    Example:
        evaluate_tasks("m/", plan["math"], settings=EvalSettings(limit=50, device="cuda"))
    """
    tasks = list(dict.fromkeys(tasks))
    path = None if cache is False else (cache_file() if cache is True else Path(cache))
    store = ScoreCache(path) if path else None
    try:
        return _evaluate_tasks(model_dir, tasks, store, settings, add_bos_token=add_bos_token, progress=progress)
    finally:
        store and store.close()


def _evaluate_tasks(model_dir, tasks, store: ScoreCache | None, settings: EvalSettings, *, add_bos_token,
                    progress) -> dict[str, float | None]:
    memo = store.prefixed("weights:") if store else {}
    known = dict(memo)
    identity = model_identity(model_dir, memo)
    if store and memo != known:
        store.put({f"weights:{k}": v for k, v in memo.items() if k not in known})
    from .tasks import tasks_digest
    digests = {t.include: tasks_digest(t.include) for t in tasks if t.include}
    scores, todo = {}, []
    code_ok = os.environ.get(CODE_EVAL) == "1"
    keys = {t: _task_key(identity, t, settings.limit, settings.chat_template, add_bos_token, digests) for t in tasks}
    stored = store.get(keys.values()) if store else {}
    for t, key in keys.items():
        if t.unsafe_code and not code_ok:
            scores[t.name] = None
            progress and progress(f"{t.name} (skipped: it runs code; {CODE_EVAL}=1 allows it)", False)
        elif key in stored:
            scores[t.name] = stored[key]
            progress and progress(f"{t.name} (cached)", False)
        else:
            todo.append((t, key))
    if not todo:
        return scores
    new = _run_lm_eval(model_dir, todo, settings=settings, add_bos_token=add_bos_token, code_ok=code_ok,
                       progress=progress)
    scores.update({t.name: new[key] for t, key in todo})
    if store:
        store.put(new)
    return scores


def _run_lm_eval(model_dir, todo, *, settings: EvalSettings, add_bos_token, code_ok,
                 progress=None) -> dict[str, float]:
    """{cache key: score} of the items in `todo`, through lm-eval's simple_evaluate: (task, key) pairs
    on the first settings.limit examples, or (task, key, (start, stop)) on examples start..stop-1 (from 0:
    lm-eval's limit, which groups of tasks take too; stop None: all). Tasks of the same shots and
    limit share a call, unless `progress` (called as in evaluate_tasks) is to be told of each: it is
    called outside lm_eval_output, so it may write to stderr. The model's eager ops run on
    common.threads' share of the cores (one for the zoo's models)."""
    import lm_eval
    import lm_eval.evaluator
    from lm_eval.tasks import TaskManager
    from lm_eval.models.huggingface import HFLM
    includes = sorted({item[0].include for item in todo if item[0].include})
    extra = {} if add_bos_token is None else {"add_bos_token": add_bos_token}
    limit, chat_template, verbose = settings.limit, settings.chat_template, settings.verbose
    with lm_eval_output(verbose):
        # lm-eval's own ~15k task index takes seconds to build: skip it when only generated tasks run
        manager = TaskManager(include_path=includes or None,
                              include_defaults=any(not item[0].include for item in todo))
        lm = HFLM(pretrained=str(model_dir), device=settings.device, batch_size=settings.batch_size,
                  dtype=settings.dtype, **extra)
    calls = []     # [(shots, limit or "samples", {task name: item})]: one simple_evaluate each
    for item in todo:
        t, (start, stop) = item[0], item[2] if len(item) > 2 else (0, limit)
        kind = stop if start == 0 else "samples"
        call = None if progress else next(
            (c for shots, k, c in calls if (shots, k) == (t.num_fewshot, kind) and t.name not in c), None)
        if call is None:
            calls.append((t.num_fewshot, kind, call := {}))
        call[t.name] = item
    new = {}
    for shots, kind, group in calls:
        samples = {name: list(range(*item[2])) for name, item in group.items()} if kind == "samples" else None
        # lm-eval's record of the environment (torch's collect_env runs pip, compilers, nvidia-smi:
        # ~1.6 s a call) goes with the rest of its results but the scores: not collected
        with lm_eval_output(verbose), _replaced(lm_eval.evaluator, "add_env_info", lambda r: None), \
                model_threads(lm.model):
            out = lm_eval.simple_evaluate(
                model=lm, tasks=list(group), num_fewshot=shots, limit=None if samples else kind, samples=samples,
                task_manager=manager, apply_chat_template=chat_template, fewshot_as_multiturn=chat_template,
                log_samples=False, confirm_run_unsafe_code=code_ok, bootstrap_iters=0)
        for name, item in group.items():
            new[item[1]] = float(_pick(out["results"][name], item[0].metric, name))
            progress and progress(name, True)
    return new


def evaluate_ranges(model_dir, requests, *, batch_size=8, device="cpu", add_bos_token: bool | None = None,
                    dtype="auto", verbose: bool = False) -> list[float | None]:
    """Scores of the model in `model_dir` on (task, start, stop) requests: the task's metric over its
    examples start..stop-1 (stop None: all), uncached (the caller keeps them: tune.database's score store).
    Tasks that execute code give None unless HF_ALLOW_CODE_EVAL=1, as in evaluate_tasks."""
    code_ok = os.environ.get(CODE_EVAL) == "1"
    todo = [(t, i, (start, stop)) for i, (t, start, stop) in enumerate(requests)
            if (code_ok or not t.unsafe_code) and (stop is None or stop > start)]
    if not todo:
        return [None] * len(requests)
    settings = EvalSettings(batch_size=batch_size, device=device, dtype=dtype, verbose=verbose)
    new = _run_lm_eval(model_dir, todo, settings=settings, add_bos_token=add_bos_token, code_ok=code_ok)
    return [new.get(i) for i in range(len(requests))]


def task_size(t: Task) -> int | None:
    """How many examples lm-eval evaluates for the task: a generated task's data lines, else the
    length of the task's evaluation split (lm-eval builds the task: seconds for real ones); None for
    a group of tasks (each of its tasks has its own)."""
    data = Path(t.include or "") / f"{t.name}.jsonl"     # eval.tasks writes a generated task's data there
    if t.include and data.exists():
        with open(data) as f:
            return sum(1 for line in f if line.strip())
    from lm_eval.tasks import TaskManager, get_task_dict
    with lm_eval_output():
        task = get_task_dict([t.name], TaskManager()).get(t.name)
    return len(list(task.eval_docs)) if hasattr(task, "eval_docs") else None


def domain_scores(plan: dict[str, tuple[Task, ...]], task_scores: dict[str, float | None]) -> dict[str, float | None]:
    """Each domain's score: the mean of its tasks' scores (tasks not run are left out; None if none ran)."""
    out = {}
    for domain, ts in plan.items():
        vals = [task_scores[t.name] for t in ts if task_scores.get(t.name) is not None]
        out[domain] = sum(vals) / len(vals) if vals else None
    return out


def bos_token(family: str) -> bool | None:
    """The zoo's models were trained on <s> + prompt: give them a BOS; real families keep lm-eval's default."""
    return True if domain_tasks.family_of(family) == domain_tasks.ZOO else None


def evaluate(model_dir, *, settings: EvalSettings = EvalSettings(), family: str = domain_tasks.ZOO, domains=None,
             general: bool = True, cache: bool | Path = True, zoo_tasks: Path | None = None) -> dict[str, float | None]:
    """{domain: score} of the model in `model_dir` on a family's domains (default all five) and,
    with general=True, "general" (the forgetting tasks' mean), lm-eval run as `settings` say. Cached;
    see evaluate_tasks."""
    p = domain_tasks.plan(family, domains, general=general, zoo_tasks=zoo_tasks)
    ts = evaluate_tasks(model_dir, [t for group in p.values() for t in group], settings=settings,
                        add_bos_token=bos_token(family), cache=cache)
    return domain_scores(p, ts)


def comparison_refs(family: str, domains, zoo: Path | None = None) -> tuple[str, dict[str, str]]:
    """(base, {domain: expert}) to compare against: the zoo's folders, or MergeBench hub ids."""
    if domain_tasks.family_of(family) == domain_tasks.ZOO:
        if zoo is None:
            raise ValueError("the zoo family needs the zoo folder (--zoo DIR, with base/ and one folder a domain)")
        return str(Path(zoo) / "base"), {d: str(Path(zoo) / d) for d in domains}
    return domain_tasks.base_ref(family), {d: domain_tasks.expert_ref(family, d) for d in domains}


def _local(ref: str, role: str) -> Path:
    """A folder for a reference: a path as is, a hub id downloaded (engine.inputs.resolve; HF offline honoured)."""
    if Path(ref).exists():
        return Path(ref)
    from ..engine.inputs.resolve import resolve
    return resolve(ref, role).path


def report(model_dir, *, settings: EvalSettings = EvalSettings(), family: str = domain_tasks.ZOO, domains=None,
           zoo: Path | None = None, cache: bool | Path = True, split: str = "test", progress=None) -> dict:
    """Evaluate a (merged) model and compare it: per-domain scores, normalised performance against
    each domain's expert, forgetting on the general tasks against the base, and the merge's runtime
    from MODEL_DIR/mbmerge.json. Experts and base are evaluated through the same cache, lm-eval run as
    `settings` say (EvalSettings). split: "validation" scores the tuning data instead
    (domain_tasks.plan); real families then have no forgetting tasks. progress: called with a line
    ("k of N: ...", with an estimate of the time left) as each model's task is done."""
    from .metrics import forgetting, normalised_performance
    family = domain_tasks.family_of(family)
    p = domain_tasks.plan(family, domains, split=split)
    domains = [d for d in p if d != domain_tasks.GENERAL]
    general_tasks = p.get(domain_tasks.GENERAL, ())
    kw = dict(settings=settings, add_bos_token=bos_token(family), cache=cache)
    tasks = list(dict.fromkeys(t for ts in p.values() for t in ts))
    steps = Progress(total=len(tasks) + sum(len(p[d]) for d in domains) + len(general_tasks), say=progress,
                     prefix="mbmerge eval") if progress else None

    def tick(who: str):
        return (lambda what, timed: steps.step(f"{who}: {what}", timed=timed)) if steps else None
    task_scores = evaluate_tasks(model_dir, tasks, progress=tick("the model"), **kw)
    scores = domain_scores(p, task_scores)
    base_ref, expert_refs = comparison_refs(family, domains, zoo)
    expert_scores = {}
    for d in domains:
        ts = evaluate_tasks(_local(expert_refs[d], f"expert {d}"), p[d], progress=tick(f"the {d} expert"), **kw)
        expert_scores[d] = domain_scores({d: p[d]}, ts)[d]
    general = [t.name for t in general_tasks]
    base_tasks = evaluate_tasks(_local(base_ref, "base"), general_tasks, progress=tick("the base"), **kw) \
        if general else {}
    record = Path(model_dir) / "mbmerge.json"
    merge = None
    if record.exists():
        r = json.loads(record.read_text())
        merge = {"method": r.get("method"), "wall_seconds": r.get("wall_seconds")}
    return {
        "model": str(model_dir), "family": family,
        "settings": {"limit": settings.limit, "chat_template": settings.chat_template,
                     "batch_size": settings.batch_size, "device": settings.device, "split": split},
        "tasks": task_scores, "scores": scores,
        "skipped": sorted(t for t, v in task_scores.items() if v is None),
        "experts": {d: {"ref": expert_refs[d], "score": expert_scores[d]} for d in domains},
        "normalised_performance": normalised_performance(scores, expert_scores, domains),
        "base": {"ref": base_ref, "tasks": base_tasks},
        "forgetting": forgetting({t: task_scores.get(t) for t in general}, base_tasks, general),
        "merge": merge,
    }
