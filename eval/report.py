"""The demo's report: one table of every model (base, experts, multi-task model, merges) with its
per-domain scores, normalised performance, forgetting and merge time, as markdown, JSON and three
PNG plots (MergeBench's views: scores per domain, normalised performance against merge time,
forgetting). Knows nothing of how the numbers were made.
"""
import json
from pathlib import Path


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
                 fmt(r["normalised"]), fmt(r["forgetting"]), fmt(r["merge_seconds"], "{:.2f}"),
                 fmt(r.get("stats_seconds"), "{:.1f}"), fmt(r.get("validation_seconds"), "{:.1f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plots(rows: list[dict], domains: list[str], out: Path) -> list[Path]:
    """scores.png (per-domain score of every model), efficiency.png (normalised performance vs
    merge time of the merges), forgetting.png (forgetting of the merges and the multi-task model)."""
    out.mkdir(parents=True, exist_ok=True)
    files = []

    fig, ax = _figure((max(8, 0.6 * len(rows) * len(domains) / 3), 4.5))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        ax.bar([d + i * width for d in range(len(domains))], [r["scores"].get(d, 0) for d in domains], width,
               label=r["model"])
    ax.set_xticks([d + 0.4 - width / 2 for d in range(len(domains))], domains)
    ax.set_ylabel("score")
    ax.set_title("Score per domain")
    ax.legend(fontsize=7, ncol=2, bbox_to_anchor=(1.01, 1), loc="upper left")
    files.append(_save(fig, out / "scores.png"))

    merges = [r for r in rows if r["kind"] in ("merge", "tuned") and r["normalised"] is not None]
    fig, ax = _figure((6, 4.5))
    for r in merges:
        seconds = r["merge_seconds"] + (r.get("stats_seconds") or 0) + (r.get("validation_seconds") or 0)
        ax.scatter(seconds, r["normalised"])
        ax.annotate(r["model"], (seconds, r["normalised"]), fontsize=8, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("merge time, with collecting statistics and tuning (s)")
    ax.set_ylabel("normalised performance")
    ax.set_title("Normalised performance vs merge time")
    files.append(_save(fig, out / "efficiency.png"))

    forget = [r for r in rows if r["forgetting"] is not None]
    fig, ax = _figure((max(6, 0.5 * len(forget)), 4.5))
    ax.bar([r["model"] for r in forget], [r["forgetting"] for r in forget])
    ax.set_ylabel("forgetting (relative drop of general score vs base)")
    ax.set_title("Forgetting")
    ax.tick_params(axis="x", rotation=60)
    files.append(_save(fig, out / "forgetting.png"))
    return files


def _figure(size: tuple):
    """A Figure of its own (no pyplot state, no display); matplotlib is imported here, on use: at the
    top it cost every mbmerge command 0.3 s of start-up."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=size)
    return fig, fig.add_subplot()


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def write_report(rows: list[dict], domains: list[str], out: Path, preface: str = "") -> str:
    """report.md, report.json and the plots in `out`; returns the markdown table."""
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, domains)
    images = plots(rows, domains, out)
    (out / "report.json").write_text(json.dumps({"domains": domains, "models": rows}, indent=2) + "\n")
    (out / "report.md").write_text(f"# mbmerge demo\n\n{preface}\n\n{table}\n\n"
                                   + "\n".join(f"![{p.stem}]({p.name})" for p in images) + "\n")
    return table
