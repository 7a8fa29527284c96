"""Which lm-eval tasks measure each MergeBench domain, and forgetting, for a model family.

Real families (MergeBench's 8 bases) use MergeBench's own evaluation, as far as lm-eval 0.4.13
carries it (MergeBench's scripts/evaluate.sh, github.com/uiuctml/MergeBench), with no chat template:

| domain       | lm-eval tasks (metric)                                                        |
|--------------|-------------------------------------------------------------------------------|
| math         | gsm8k_cot 8-shot (exact_match, flexible-extract); hendrycks_math 0-shot (exact_match) |
| multilingual | m_mmlu (acc), arc (acc_norm), hellaswag (acc_norm) in fr, es, de, ru; 0-shot  |
| instruction  | ifeval (inst_level_loose_acc; MergeBench's choice among the four is not public) |
| coding       | humaneval_plus, mbpp_plus (pass@1, greedy): code execution, opt-in (HF_ALLOW_CODE_EVAL=1) |
| safety       | toxigen (acc_norm), truthfulqa_mc2 (acc): a proxy, see below                  |
| general      | mmlu, triviaqa, squadv2, coqa, pubmedqa, wmt14-fr-en (forgetting)              |

Safety: MergeBench scores refusals with an external harness (WildGuardTest, HarmBench, XSTest,
DAN); lm-eval 0.4.13 has none of them, nor any refusal task. The closest it has without an
external API are toxigen (does the model recognise harmful statements about groups) and
truthfulqa_mc2 (does it prefer truthful over imitative falsehoods), the proxy FusionBench also
uses; realtoxicityprompts needs the Perspective API, so it is left out. Coding: MergeBench uses
bigcode-evaluation-harness (temperature 0.2, 10 samples); lm-eval's humaneval_plus/mbpp_plus
are greedy pass@1 at their default shots (0 and 3), and humaneval's metric loads HF `evaluate`'s
code_eval (from the Hub on first use).

The zoo family uses the tasks eval.tasks generates from common.domains (metric `score`, the
domain's checker). Knows nothing of models or of running lm-eval.
"""
from dataclasses import dataclass
from pathlib import Path

from ..common.names import MERGEBENCH_BASES, MERGEBENCH_DOMAINS, mergebench_repo

GENERAL = "general"
ZOO = "zoo"
ZOO_EXAMPLES = 100  # test examples written per zoo domain (--limit takes fewer)

@dataclass(frozen=True, kw_only=True)
class Task:
    """One lm-eval task (or group) and the number that stands for it."""
    name: str                       # lm-eval task name
    metric: str                     # key in lm-eval's results: "metric,filter"
    num_fewshot: int | None = None  # None: the task's own default
    unsafe_code: bool = False       # executes model-written code: only with HF_ALLOW_CODE_EVAL=1
    include: str | None = None      # folder of generated task YAML (lm-eval include_path)


def _lang(task: str, metric: str) -> tuple[Task, ...]:
    return tuple(Task(name=f"{task}_{lang}", metric=metric, num_fewshot=0) for lang in ("fr", "es", "de", "ru"))


def _zero_shot(*tasks: tuple[str, str]) -> tuple[Task, ...]:
    return tuple(Task(name=name, metric=metric, num_fewshot=0) for name, metric in tasks)


MERGEBENCH = {
    "math": (Task(name="gsm8k_cot", metric="exact_match,flexible-extract", num_fewshot=8),
             *_zero_shot(("hendrycks_math", "exact_match,none"))),
    "multilingual": (*_lang("m_mmlu", "acc,none"), *_lang("arc", "acc_norm,none"),
                     *_lang("hellaswag", "acc_norm,none")),
    "instruction": _zero_shot(("ifeval", "inst_level_loose_acc,none")),
    "coding": (Task(name="humaneval_plus", metric="pass_at_k,create_test", num_fewshot=0, unsafe_code=True),
               Task(name="mbpp_plus", metric="pass_at_1,none", num_fewshot=3, unsafe_code=True)),
    "safety": _zero_shot(("toxigen", "acc_norm,none"), ("truthfulqa_mc2", "acc,none")),
    GENERAL: _zero_shot(("mmlu", "acc,none"), ("triviaqa", "exact_match,remove_whitespace"), ("squadv2", "f1,none"),
                        ("coqa", "f1,none"), ("pubmedqa", "acc,none"), ("wmt14-fr-en", "bleu,none")),
}


# Validation ("surrogate") tasks for tuning on real families: MergeBench's scripts/validate.sh, as far as
# lm-eval carries it. Its instruction row is the IFEval test task itself (as released); lambada_openai is
# English; CoNaLa (coding) and WildJailbreak (safety) run in other harnesses, so those domains cannot be
# validated here.
VALIDATION = {
    "instruction": _zero_shot(("ifeval", "inst_level_loose_acc,none")),
    "math": _zero_shot(("mmlu_stem", "acc,none")),
    "multilingual": _zero_shot(("lambada_openai", "acc,none")),
}


def families() -> list[str]:
    return [ZOO, *MERGEBENCH_BASES]


def family_of(name: str) -> str:
    """Normalise a --family value ('Gemma-2-2B', 'google/gemma-2-2b' -> 'gemma-2-2b')."""
    key = name.rstrip("/").split("/")[-1].lower()
    if key != ZOO and key not in MERGEBENCH_BASES:
        raise ValueError(f"unknown family {name!r}: choose one of {', '.join(families())}")
    return key


def expert_ref(family: str, domain: str) -> str:
    """MergeBench's expert hub id for a real family: ('gemma-2-2b', 'math') -> 'MergeBench/gemma-2-2b_math'."""
    return mergebench_repo(base_ref(family), domain)


def base_ref(family: str) -> str:
    return MERGEBENCH_BASES[family_of(family)]


def zoo_tasks_dir(n: int = ZOO_EXAMPLES, seed: int = 0, split: str = "test") -> Path:
    """The zoo's generated lm-eval tasks (of one split of its domains), written on first use under
    the cache, in a folder named by common/domains.py's digest (a changed domain gets fresh tasks)."""
    import hashlib
    from ..common import domains
    from ..common.cache import cache_dir
    from . import tasks
    version = hashlib.sha256(Path(domains.__file__).read_bytes() + Path(tasks.__file__).read_bytes()).hexdigest()[:12]
    folder = cache_dir() / "eval-tasks" / f"zoo-{version}-n{n}-s{seed}{'' if split == 'test' else '-' + split}"
    if not (folder / f"{tasks.task_name(GENERAL)}.yaml").exists():
        tasks.write_tasks(folder, [*domains.DOMAINS.values(), domains.GENERAL], split=split, n=n, seed=seed)
    return folder


def plan(family: str, domains=None, *, general: bool = True, zoo_tasks: Path | None = None,
         split: str = "test") -> dict[str, tuple[Task, ...]]:
    """{domain: its lm-eval tasks} for a family; with general=True also {"general": forgetting tasks}.

    Args:
        family: 'zoo' or a MergeBench base (see common.names.MERGEBENCH_BASES).
        domains: subset of MERGEBENCH_DOMAINS (default all five).
        zoo_tasks: folder of generated zoo tasks (default: zoo_tasks_dir(split=split), written if missing).
        split: "test" (evaluation) or "validation" (tuning: the zoo's validation split, or for a real
            family the VALIDATION surrogates; there, no forgetting tasks).
    """
    family = family_of(family)
    domains = list(domains or MERGEBENCH_DOMAINS)
    bad = [d for d in domains if d not in MERGEBENCH_DOMAINS]
    if bad:
        raise ValueError(f"unknown domain(s) {', '.join(bad)}: choose from {', '.join(MERGEBENCH_DOMAINS)}")
    if split not in ("test", "validation"):
        raise ValueError(f"split must be test or validation, not {split!r}")
    wanted = domains + ([GENERAL] if general else [])
    if family != ZOO and split == "validation":
        missing = [d for d in domains if d not in VALIDATION]
        if missing:
            raise ValueError(f"no lm-eval validation task for {', '.join(missing)} (MergeBench validates them in "
                             f"other harnesses); validate on {', '.join(VALIDATION)}")
        return {d: VALIDATION[d] for d in domains}
    if family != ZOO:
        return {d: MERGEBENCH[d] for d in wanted}
    from .tasks import METRIC, task_name
    include = str(zoo_tasks or zoo_tasks_dir(split=split))
    return {d: (Task(name=task_name(d), metric=f"{METRIC},none", num_fewshot=0, include=include),) for d in wanted}


def describe(p: dict[str, tuple[Task, ...]]) -> str:
    """The exact task list and settings, one line a task (for --dry-run)."""
    lines = []
    for domain, ts in p.items():
        for t in ts:
            shots = "default" if t.num_fewshot is None else t.num_fewshot
            extra = (" code-execution(HF_ALLOW_CODE_EVAL=1)" if t.unsafe_code else "") + \
                    (f" include_path={t.include}" if t.include else "")
            lines.append(f"{domain:13s} {t.name:22s} metric={t.metric} num_fewshot={shots}{extra}")
    return "\n".join(lines)
