"""Successive halving as an Optuna pruner: a trial's intermediate value at rung r is its NP on the
first share of the validation examples (tune.rungs' fractions); at each rung the best 1/ETA of
every trial that reached it go on, the rest are pruned.

Optuna's own SuccessiveHalvingPruner is asynchronous: a trial is judged against those that reached
the rung before it, so the first trials of a grid always go on. Here the trials of a batch all report
a rung before any is judged (tune.search scores a batch rung by rung), so the grid is halved as the
method says: score every candidate on a small subset, keep the best third, grow the subset.
"""
import math

import optuna

from .objectives import pareto_ranks

ETA = 3
HALVING = (1 / 9, 1 / 3, 1.0)     # the shares of the validation examples at rungs 0, 1, 2
PRUNERS = ("none", "halving")


class SuccessiveHalving(optuna.pruners.BasePruner):
    def __init__(self, eta: int = ETA):
        self.eta = eta

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        """True unless the trial's value at its last rung is among the best ceil(n / eta) of the n
        trials with a value there (ties go on together); a trial with no value (NP undefined) goes on.
        A multi-objective study is halved by tune.search itself (Optuna's trials report one value)."""
        step = trial.last_step
        if step is None:
            return False
        sign = 1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1
        value = sign * trial.intermediate_values[step]
        values = [sign * t.intermediate_values[step] for t in study.get_trials(deepcopy=False)
                  if step in t.intermediate_values]
        better = sum(v > value for v in values)
        return better >= math.ceil(len(values) / self.eta)


def fractions(prune: str | None) -> tuple[float, ...]:
    return HALVING if prune == "halving" else (1.0,)


def pruner(prune: str | None) -> optuna.pruners.BasePruner:
    return SuccessiveHalving() if prune == "halving" else optuna.pruners.NopPruner()


def halved(scored: list, objectives) -> list:
    """The trials a rung prunes (scored: (trial, its objectives' values)): one objective, those the pruner
    says (SuccessiveHalving); several, all but the best ceil(n / ETA) by Pareto front, then by the first
    objective."""
    if len(objectives) == 1:
        return [t for t, _ in scored if t.should_prune()]
    told = [[o.told(x) for o, x in zip(objectives, values)] for _, values in scored]
    ranks = pareto_ranks(told, [o.direction for o in objectives])
    order = sorted(range(len(scored)), key=lambda i: (ranks[i], -objectives[0].better(scored[i][1][0])))
    return [scored[i][0] for i in order[math.ceil(len(scored) / ETA):]]
