"""MergeBench's two summary numbers (arXiv:2505.10833), from per-domain and per-task scores.

- normalised performance: r_d = merged_d / expert_d on each domain d, then NP = mean_d r_d
  (the expert is the fine-tune on d; 1.0 means the merge keeps all of it);
- forgetting: f_t = (base_t - merged_t) / base_t on each general task t, then F = mean_t f_t
  (> 0: the merge lost base knowledge; < 0: it gained).

A domain or task is left out (its ratio None, not in the mean) when either score is missing or
the denominator is zero, since a ratio to a zero expert or base says nothing. Knows nothing of
lm-eval.
"""


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def normalised_performance(scores: dict, expert_scores: dict, domains=None) -> dict:
    """{"mean": NP, "per_domain": {d: merged_d / expert_d}}.

    Args:
        scores: the merged model's {domain: score}.
        expert_scores: {domain: the score of domain d's expert on d}.
        domains: which domains (default: those in expert_scores).
    """
    per = {}
    for d in (domains or list(expert_scores)):
        m, e = scores.get(d), expert_scores.get(d)
        per[d] = None if m is None or e is None or e == 0 else m / e
    return {"mean": _mean(per.values()), "per_domain": per}


def forgetting(scores: dict, base_scores: dict, tasks=None) -> dict:
    """{"mean": F, "per_task": {t: (base_t - merged_t) / base_t}} over the general tasks.

    Args:
        scores: the merged model's {general task: score}.
        base_scores: the base's {general task: score}.
        tasks: which tasks (default: those in base_scores).
    """
    per = {}
    for t in (tasks or list(base_scores)):
        m, b = scores.get(t), base_scores.get(t)
        per[t] = None if m is None or b is None or b == 0 else (b - m) / b
    return {"mean": _mean(per.values()), "per_task": per}
