"""The demo's report: one table of every model (base, experts, multi-task model, merges) with its
per-domain scores, normalised performance, forgetting and merge time, as markdown, JSON and three
PNG plots (MergeBench's views: scores per domain, normalised performance against merge time,
forgetting). Knows nothing of how the numbers were made.
"""
import json
import textwrap
from pathlib import Path


REFERENCES = ("base", "expert", "multitask")    # the kinds a merge is compared with, not merges


def np_text(row: dict, rows: list[dict], domains: list[str]) -> str:
    """A row's normalised performance, or why it has none: NP = mean over domains of score / that
    domain's expert's score, so where every expert scores 0 on its own domain (the micro zoo's) it
    is undefined, not 0."""
    if row["normalised"] is not None:
        return f"{row['normalised']:.3f}"
    own = {r["model"]: r["scores"].get(r["model"]) for r in rows if r["kind"] == "expert"}
    if domains and all(own.get(d) == 0 for d in domains):
        return "undefined (expert scores 0)"
    return "undefined (no domain scored)"


def undefined_note(rows: list[dict], domains: list[str]) -> str | None:
    """A sentence for the report when some normalised performance is undefined, naming the experts
    that score 0 on their own domain."""
    undefined = sum(r["normalised"] is None for r in rows)
    if not undefined:
        return None
    zero = [r["model"] for r in rows if r["kind"] == "expert" and r["scores"].get(r["model"]) == 0]
    why = (f"the {', '.join(zero)} expert{'s score' if len(zero) > 1 else ' scores'} 0 on "
           f"{'their' if len(zero) > 1 else 'its'} own domain, and a ratio to 0 has no value" if zero
           else "no domain has both scores")
    return (f"Normalised performance (score / the domain expert's score) is undefined for {undefined} of "
            f"{len(rows)} models: {why}; compare the raw scores instead.")


def markdown(rows: list[dict], domains: list[str]) -> str:
    """rows: {"model", "kind", "scores": {domain: float}, "general", "normalised", "forgetting",
    "merge_seconds", "stats_seconds" (collecting a data-aware method's statistics), "validation_seconds"
    (tuning)} (None where it does not apply)."""
    fmt = lambda v, f="{:.3f}": "—" if v is None else f.format(v)  # noqa: E731
    head = ["model", "kind", *domains, "general", "normalised perf.", "forgetting", "merge s", "statistics s",
            "validation s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], r["kind"], *(fmt(r["scores"].get(d)) for d in domains), fmt(r["general"]),
                 np_text(r, rows, domains), fmt(r["forgetting"]), fmt(r["merge_seconds"], "{:.2f}"),
                 fmt(r.get("stats_seconds"), "{:.1f}"), fmt(r.get("validation_seconds"), "{:.1f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def eval_table(rep: dict) -> str:
    """`mbmerge eval`'s answer (a harness.report dict) for a reader: per domain the score, the
    domain expert's and their ratio; per general task the score, the base's and the forgetting;
    then the two means, or why they have no value."""
    fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    np_, forget = rep["normalised_performance"], rep["forgetting"]
    lines = ["| domain | score | expert | normalised |", "|---|---|---|---|"]
    lines += [f"| {d} | {fmt(rep['scores'].get(d))} | {fmt(e['score'])} | {fmt(np_['per_domain'].get(d))} |"
              for d, e in rep["experts"].items()]
    if forget["per_task"]:
        lines += ["", "| general task | score | base | forgetting |", "|---|---|---|---|"]
        lines += [f"| {t} | {fmt(rep['tasks'].get(t))} | {fmt(rep['base']['tasks'].get(t))} | {fmt(f)} |"
                  for t, f in forget["per_task"].items()]
    lines += ["", f"normalised performance: {fmt(np_['mean']) if np_['mean'] is not None else _no_np(rep)}",
              f"forgetting: {fmt(forget['mean']) if forget['mean'] is not None else _no_forgetting(rep)}"]
    if rep["skipped"]:
        lines.append(f"not run: {', '.join(rep['skipped'])} (they execute code: HF_ALLOW_CODE_EVAL=1 allows it)")
    if rep.get("merge") and rep["merge"].get("wall_seconds") is not None:
        lines.append(f"merge: {rep['merge']['method']}, {rep['merge']['wall_seconds']:.2f} s")
    return "\n".join(lines)


def _no_np(rep: dict) -> str:
    zero = [d for d, e in rep["experts"].items() if e["score"] == 0]
    return (f"undefined (the {', '.join(zero)} expert{'s score' if len(zero) > 1 else ' scores'} 0 on "
            f"{'their' if len(zero) > 1 else 'its'} own domain)" if zero else "undefined (no domain scored)")


def _no_forgetting(rep: dict) -> str:
    if not rep["forgetting"]["per_task"]:
        return "— (no general tasks)"
    return ("undefined (the base scores 0 on the general tasks)" if all(v == 0 for v in rep["base"]["tasks"].values())
            else "undefined (no general task scored)")


def heatmap_order(rows: list[dict]) -> list[dict]:
    """The heatmap's rows, top to bottom: the references (base, experts, multi-task model) as given,
    then the merges by decreasing normalised performance (undefined last, in their order)."""
    refs = [r for r in rows if r["kind"] in REFERENCES]
    merges = [r for r in rows if r["kind"] not in REFERENCES]
    return refs + sorted(merges, key=lambda r: (r["normalised"] is None, -(r["normalised"] or 0)))


def plots(rows: list[dict], domains: list[str], out: Path) -> list[Path]:
    """scores.png (every model's score on every domain, as a heatmap), efficiency.png (normalised
    performance vs merge time of the merges), forgetting.png (forgetting of the merges and the
    multi-task model)."""
    out.mkdir(parents=True, exist_ok=True)
    return [_scores_plot(rows, domains, out / "scores.png"), _efficiency_plot(rows, domains, out / "efficiency.png"),
            _forgetting_plot(rows, out / "forgetting.png")]


def _scores_plot(rows: list[dict], domains: list[str], path: Path) -> Path:
    """A heatmap, models x (domains, general), each cell's value written in it: readable with 30
    models, where grouped bars need 30 colours. References on top, apart from the merges below
    (sorted by normalised performance, shown beside each name)."""
    ordered = heatmap_order(rows)
    columns = [*domains, "general"]
    values = [[(r["general"] if c == "general" else r["scores"].get(c)) for c in columns] for r in ordered]
    fig, ax = _figure((1.0 * len(columns) + 4, 0.32 * len(ordered) + 2))
    cells = [[float("nan") if v is None else v for v in row] for row in values]
    image = ax.imshow(cells, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, "—" if v is None else f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="0.4" if v is None else "black" if v > 0.6 else "white")
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    ax.set_yticks(range(len(ordered)), [f"{r['model']}  (NP {_short_np(r)})" for r in ordered], fontsize=8)
    ax.axvline(len(domains) - 0.5, color="white", linewidth=1.5)     # the domains apart from general knowledge
    n_refs = sum(r["kind"] in REFERENCES for r in ordered)
    if 0 < n_refs < len(ordered):   # the references apart from the merges
        ax.axhline(n_refs - 0.5, color="white", linewidth=3)
        ax.text(len(columns) - 0.45, (n_refs - 1) / 2, "references", rotation=-90, va="center", fontsize=8)
        ax.text(len(columns) - 0.45, (n_refs + len(ordered) - 1) / 2, "merges", rotation=-90, va="center",
                fontsize=8)
    fig.colorbar(image, ax=ax, label="score", fraction=0.04, pad=0.08)
    ax.set_title("Score per domain; merges by normalised performance (NP)")
    return save_figure(fig, path)


def _short_np(row: dict) -> str:
    return "undefined" if row["normalised"] is None else f"{row['normalised']:.2f}"


def _efficiency_plot(rows: list[dict], domains: list[str], path: Path) -> Path:
    """The merges' normalised performance against their time (with statistics and tuning), each
    point named in a column right of the axes, spread so no two names overlap, with a leader line."""
    merges = [r for r in rows if r["kind"] not in REFERENCES and r["normalised"] is not None]
    fig, ax = _figure((7.5, max(4.5, 0.22 * len(merges) + 1.5)))
    points = sorted(((r["merge_seconds"] + (r.get("stats_seconds") or 0) + (r.get("validation_seconds") or 0),
                      r["normalised"], r["model"]) for r in merges),
                    key=lambda p: (p[1], p[0]))   # at equal heights the left point's label below: no crossed leaders
    ax.scatter([x for x, _, _ in points], [y for _, y, _ in points], s=18, zorder=3)
    if not points:
        reason = undefined_note(rows, domains) or "no merges"
        ax.text(0.5, 0.5, "\n".join(textwrap.wrap(reason, 60)), ha="center", va="center", transform=ax.transAxes,
                fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    else:
        ax.set_xscale("log")
        lo, hi = ax.get_ylim()
        heights = [(y - lo) / (hi - lo) for _, y, _ in points]
        gap = 9 * 1.35 / 72 / fig.get_figheight() / 0.8    # a 9-point line, in axes fractions
        for (x, y, name), at in zip(points, spread(heights, gap)):
            ax.annotate(f"{name} {y:.2f}", (x, y), xytext=(1.03, at), textcoords="axes fraction", fontsize=8,
                        va="center", annotation_clip=False,
                        arrowprops=dict(arrowstyle="-", color="0.6", linewidth=0.6, shrinkA=0, shrinkB=2))
    ax.set_xlabel("merge time, with collecting statistics and tuning (s)")
    ax.set_ylabel("normalised performance")
    ax.set_title("Normalised performance vs merge time")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def spread(heights: list[float], gap: float) -> list[float]:
    """Label heights near `heights` (axes fractions) with at least `gap` between any two, in the
    same order: each pushed up past the one below, then, where that left the axes, down from the top."""
    order = sorted(range(len(heights)), key=heights.__getitem__)
    placed, floor = {}, float("-inf")
    for i in order:
        placed[i] = floor = max(heights[i], floor + gap)
    ceiling = 1.0
    for i in reversed(order):
        placed[i] = min(placed[i], ceiling)
        ceiling = placed[i] - gap
    return [placed[i] for i in range(len(heights))]


def _forgetting_plot(rows: list[dict], path: Path) -> Path:
    forget = [r for r in rows if r["forgetting"] is not None]
    fig, ax = _figure((max(6, 0.35 * len(forget) + 2), 4.5))
    if forget:
        ax.bar(range(len(forget)), [r["forgetting"] for r in forget],
               color=["tab:orange" if r["kind"] in REFERENCES else "tab:blue" for r in forget])
        ax.set_xticks(range(len(forget)), [r["model"] for r in forget], rotation=60, ha="right",
                      rotation_mode="anchor", fontsize=8)
        ax.axhline(0, color="0.3", linewidth=0.8)
    else:   # say why rather than draw empty axes
        base = next((r["general"] for r in rows if r["kind"] == "base"), None)
        why = ("the base scores 0 on the general-knowledge tasks, and a drop relative to 0 has no value"
               if base == 0 else "no model has both a general-knowledge score and a base to compare with")
        ax.text(0.5, 0.5, "\n".join(textwrap.wrap(f"Forgetting is undefined for every model: {why}.", 60)),
                ha="center", va="center", transform=ax.transAxes, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_ylabel("forgetting\n(relative drop of the general score vs the base)")
    ax.set_title("Forgetting (orange: base, experts, multi-task model)")
    return save_figure(fig, path)


def _figure(size: tuple):
    """A Figure of its own (no pyplot state, no display); matplotlib is imported here, on use: at the
    top it cost every mbmerge command 0.3 s of start-up."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=size)
    return fig, fig.add_subplot()


def save_figure(fig, path: Path) -> Path:
    """Laid out, and cropped to what was drawn (labels outside the axes included, none cut off)."""
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def write_report(rows: list[dict], domains: list[str], out: Path, preface: str = "") -> str:
    """report.md, report.json and the plots in `out`; returns the markdown table."""
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, domains)
    images = plots(rows, domains, out)
    (out / "report.json").write_text(json.dumps({"domains": domains, "models": rows}, indent=2) + "\n")
    note = undefined_note(rows, domains)
    (out / "report.md").write_text(f"# mbmerge demo\n\n{preface}\n\n{table}\n\n" + (f"{note}\n\n" if note else "")
                                   + "\n".join(f"![{p.stem}]({p.name})" for p in images) + "\n")
    return table
