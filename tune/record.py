"""A study as the user reads it: a row per trial (tune.json keeps every one), the best completed trial,
the time split, and the markdown table, which shows each candidate once.

A trial that did not finish (interrupted by Ctrl-C, failed, or given up when its process stopped beating)
frees its point, and a later run runs the point again: that later trial supersedes it. The table shows a
point's latest trial and, under it, a line per superseded one; tune.json keeps both.
"""
from optuna.trial import TrialState

from .objectives import FORGETTING, NP, Objective, number_text, pareto_ranks, values_text
from .space import Space, point_key

UNFINISHED = ("fail", "interrupted")
LOST = "its process stopped beating (killed, or lost); the trial was given up and its point freed"


def study_record(st, method: str, v, space: Space, search, name: str, url: str, objectives=(Objective(NP),)) -> dict:
    """Every trial of the study (any process's), the best completed one and the time split; "running":
    the numbers of trials still running elsewhere (their outcome may change the best). search: the
    tune.search.Search (its prune and max_forgetting). With several objectives, "front": the completed
    trials no other completed trial dominates; the best is the best on the first objective among those
    within max_forgetting ("unmet" says why none is)."""
    prune, max_forgetting = search.prune, search.max_forgetting
    rows = [_row(t, space) for t in st.get_trials(deepcopy=False)
            if t.state != TrialState.WAITING and "params" in t.user_attrs]
    _mark_superseded(rows)
    done = [r for r in rows if r["state"] == "complete"]
    front = _front(done, objectives)
    first = objectives[0]
    within = [r for r in done if max_forgetting is None or (r["values"].get(FORGETTING) is not None
                                                            and r["values"][FORGETTING] <= max_forgetting)]
    best = max(within, key=lambda r: (r["values"].get(first.name) is not None,
                                      first.better(r["values"].get(first.name)), -r["number"]), default=None)
    return {"method": method, "study": name, "storage": url, **space.describe(), "prune": prune or "none",
            "validate": list(v.domains), "limit": v.limit, "objectives": [o.name for o in objectives],
            **({"max_forgetting": max_forgetting} if max_forgetting is not None else {}),
            **({"front": front} if len(objectives) > 1 else {}),
            **({"unmet": _unmet(done, max_forgetting)} if best is None and done else {}),
            "trials": rows,
            "best": None if best is None else {"number": best["number"], "params": best["params"], "np": best["np"],
                                                "values": best["values"], **_undefined_note(done)},
            "running": [r["number"] for r in rows if r["state"] == "running"],
            "seconds": {"merge": sum(r["merge_seconds"] for r in rows),
                        "validation": sum(r["validation_seconds"] for r in rows)},
            "examples": sum(r["examples"] for r in rows)}


def _row(t, space: Space) -> dict:
    a = t.user_attrs
    state = t.state.name.lower()
    if state == "fail" and a.get("interrupted"):
        state = "interrupted"
    error = a.get("error") or (LOST if state == "fail" else None)
    return {"number": t.number, "state": state, "params": a["params"], "searched": searched(space, a["params"]),
            "scores": a.get("scores", {}), "np": a.get("np"), "np_by_domain": a.get("np_by_domain", {}),
            "values": a.get("objectives", {NP: a.get("np")}),
            "rung": a.get("rung"), "examples": a.get("examples", 0), "merge_seconds": a.get("merge_seconds", 0.0),
            "validation_seconds": a.get("validation_seconds", 0.0), "error": error}


def _front(done: list[dict], objectives) -> list[int]:
    """The numbers of the completed trials on the Pareto front of the objectives."""
    if len(objectives) == 1:
        return []
    told = [[o.told(r["values"].get(o.name)) for o in objectives] for r in done]
    ranks = pareto_ranks(told, [o.direction for o in objectives])
    return [r["number"] for r, k in zip(done, ranks) if k == 0]


def _unmet(done: list[dict], limit: float) -> str:
    least = min((r["values"][FORGETTING] for r in done if r["values"].get(FORGETTING) is not None), default=None)
    return f"no completed trial forgets at most {limit:g} (--max-forgetting)" + \
        (f"; the least forgetting is {least:.3f}" if least is not None else "")


def _mark_superseded(rows: list[dict]) -> None:
    """An unfinished trial whose point has a later trial: "superseded_by" the latest of them."""
    latest = {}
    for r in rows:
        key = point_key(r["params"])
        latest[key] = max(latest.get(key, r["number"]), r["number"])
    for r in rows:
        last = latest[point_key(r["params"])]
        if r["state"] in UNFINISHED and last != r["number"]:
            r["superseded_by"] = last


def _undefined_note(rows: list[dict]) -> dict:
    """{"note": ...} when no trial has a normalised performance to choose by (NP divides by each
    expert's own score: every expert scoring 0 on its own domain, as the micro zoo's do, leaves it
    undefined), so "best" is only the first trial; else {}."""
    if any(r["np"] is not None for r in rows):
        return {}
    return {"note": "every candidate's NP is undefined (every expert scores 0 on its own domain, or no "
                    "domain was scored); picked the first candidate"}


def searched(space: Space, params: dict) -> dict:
    """The searched ones of a trial's parameters (the rest are the command's fixed ones)."""
    return {k: x for k, x in params.items() if k in (space.grid or space.ranges)}


def params_text(searched: dict) -> str:
    return " ".join(f"{k}={_short(x)}" for k, x in searched.items())


def table(record: dict) -> str:
    """Markdown: each candidate's latest trial with its NP on each domain (its validation score there
    when the expert scores 0) and its mean NP (the best marked), the superseded trials under it, then
    the time split."""
    domains = record["validate"]
    others = [o for o in record.get("objectives", [NP]) if o != NP]     # forgetting, task lists
    head = ["trial", "params", *(f"{d} NP" for d in domains), "NP", *others, "examples", "merge s", "validation s",
            ""]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    best = (record["best"] or {}).get("number")
    front = set(record.get("front", []))
    shown = [r for r in record["trials"] if "superseded_by" not in r]
    for r in shown:
        mark = "best" if r["number"] == best else (r["state"] if r["state"] != "complete" else "")
        mark = ", ".join(m for m in (mark, "front" if r["number"] in front else "") if m)
        cells = [str(r["number"]), params_text(r["searched"]),
                 *(_domain_cell(r, d) for d in domains),
                 number_text(r["np"]), *(number_text(r["values"].get(o)) for o in others), str(r["examples"]),
                 f"{r['merge_seconds']:.2f}", f"{r['validation_seconds']:.1f}", mark]
        lines.append("| " + " | ".join(cells) + " |")
    again = [f"trial {r['number']} ({params_text(r['searched'])}): {r['state']}, run again as trial "
             f"{r['superseded_by']}" for r in record["trials"] if "superseded_by" in r]
    lines += [""] + again if again else []
    if (record["best"] or {}).get("note"):
        lines.append(f"\nbest: {record['best']['note']}")
    if front:
        names = record["objectives"]
        named = ", ".join(f"trial {r['number']} ({values_text(names, [r['values'].get(o) for o in names])})"
                          for r in shown if r["number"] in front)
        limit = record.get("max_forgetting")
        lines.append(f"\nPareto front ({', '.join(names)}): {named}; best: the best {names[0]}"
                     + (f" among those forgetting at most {limit:g}" if limit is not None else ""))
    s, run = record["seconds"], record.get("this_run", {})
    lines.append(f"\nmerge (algorithm) time {s['merge']:.1f} s, validation time {s['validation']:.1f} s, "
                 f"{record['examples']} validation examples behind the scores"
                 + (f" ({run['evaluated']} evaluated in this run)" if "evaluated" in run else "")
                 + f"; study {record['study']}")
    return "\n".join(lines)


def _domain_cell(row: dict, domain: str) -> str:
    np, score = row["np_by_domain"].get(domain), row["scores"].get(domain)
    return f"{np:.3f}" if np is not None else "—" if score is None else f"({score:.3f})"


def _short(x) -> str:
    if isinstance(x, list):
        return "[" + ",".join(_short(y) for y in x) + "]"
    return f"{x:.3g}" if isinstance(x, float) else str(x)
