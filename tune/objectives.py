"""What a study optimises (`mbmerge tune --objective`): MergeBench's normalised performance (np, maximised),
forgetting (the relative drop of the base's general score, minimised: eval.metrics), or the mean score of
any lm-eval tasks (maximised). One objective: a single-objective study, as before. Several: a
multi-objective study whose trials Optuna's multi-objective samplers (TPE, NSGA-II) place, reported as a
Pareto front; the best written is the best on the first objective within the limits given (--max-forgetting).

A task list is written NAME[:METRIC]+NAME[:METRIC]...; METRIC is lm-eval's metric name with its filter after
a slash (acc_norm, exact_match/flexible-extract), acc when left out. On the zoo, the zoo's generated tasks
(mbmerge_zoo_*) are found by name too.
"""
from dataclasses import dataclass

from ..common.errors import BadParameter
from ..eval import domain_tasks
from ..eval.domain_tasks import GENERAL, Task
from .score import Validation, normalised

NP, FORGETTING = "np", "forgetting"
WORST = {"maximize": 0.0, "minimize": 1.0}   # told for an undefined value: no score, or a zero denominator


@dataclass(frozen=True)
class Objective:
    name: str       # np, forgetting, or a task list

    @property
    def direction(self) -> str:
        return "minimize" if self.name == FORGETTING else "maximize"

    @property
    def domain(self) -> str | None:
        """The scores it needs besides the experts' domains (the general tasks, or its task list)."""
        return None if self.name == NP else GENERAL if self.name == FORGETTING else self.name

    def tasks(self, v: Validation) -> tuple[Task, ...]:
        """The validation tasks behind the objective's own scores."""
        if self.name == FORGETTING:
            if domain_tasks.family_of(v.family) != domain_tasks.ZOO:
                raise BadParameter(f"--objective forgetting: family {v.family} has no validation split of its "
                                   f"general tasks; name lm-eval tasks instead (--objective np,TASK+TASK)")
            return domain_tasks.plan(v.family, [], split="validation")[GENERAL]
        include = str(domain_tasks.zoo_tasks_dir(split="validation")) if v.family == domain_tasks.ZOO else None
        return tuple(_task(item, include) for item in self.name.split("+"))

    def value(self, scores: dict, experts: dict, base: dict, v: Validation) -> float | None:
        """The objective of a candidate's `scores`, the experts' on their domains and the base's on the
        objectives' tasks ({domain: score}); None where it is undefined."""
        if self.name == NP:
            return normalised(scores, experts, v)
        own, ref = scores.get(self.domain), base.get(self.domain)
        if self.name == FORGETTING:
            return None if own is None or not ref else (ref - own) / ref
        return own

    def told(self, value: float | None) -> float:
        return WORST[self.direction] if value is None else value

    def better(self, value: float | None) -> float:
        """A key that grows as the value gets better (undefined: the worst)."""
        return self.told(value) if self.direction == "maximize" else -self.told(value)


def _task(item: str, include: str | None) -> Task:
    name, _, metric = item.partition(":")
    if not name:
        raise BadParameter(f"--objective: an empty task name in {item!r}")
    metric, _, filt = (metric or "acc").partition("/")
    return Task(name=name, metric=f"{metric},{filt or 'none'}", include=include)


def parse(text: str) -> tuple[Objective, ...]:
    """'np,forgetting' -> (Objective('np'), Objective('forgetting')); one line for an empty or repeated one."""
    items = [x.strip() for x in text.split(",")]
    if not all(items):
        raise BadParameter(f"--objective {text!r}: an empty objective; write e.g. np,forgetting")
    twice = [x for x in items if items.count(x) > 1]
    if twice:
        raise BadParameter(f"--objective {text!r}: {twice[0]} is given twice")
    return tuple(Objective(x) for x in items)


def dominates(a: list[float], b: list[float], directions: list[str]) -> bool:
    """Whether values a are at least as good as b on every objective and better on one."""
    better = [(x > y) if d == "maximize" else (x < y) for x, y, d in zip(a, b, directions)]
    worse = [(x < y) if d == "maximize" else (x > y) for x, y, d in zip(a, b, directions)]
    return any(better) and not any(worse)


def pareto_ranks(values: list[list[float]], directions: list[str]) -> list[int]:
    """Each point's front: 0 for the non-dominated, 1 for those only the first front dominates, ..."""
    ranks, left, rank = [None] * len(values), set(range(len(values))), 0
    while left:
        front = {i for i in left if not any(dominates(values[j], values[i], directions) for j in left if j != i)}
        for i in front:
            ranks[i] = rank
        left -= front
        rank += 1
    return ranks


def values_text(names: list[str], values: list) -> str:
    """'NP 0.712, forgetting 0.100' of objectives' names and values."""
    return ", ".join(f"{'NP' if n == NP else n} {number_text(x)}" for n, x in zip(names, values))


def number_text(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"
