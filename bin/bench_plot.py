"""The PNG of `mbmerge bench`: input GB/s per method, mbmerge beside mergekit, each method's I/O floor
as a dashed horizontal line over its bars. Uses matplotlib's Figure directly: no pyplot, no global backend."""
from pathlib import Path


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Bar chart of rows' mbmerge_in_GBps and mergekit_in_GBps (where present), log scale, saved to `path`."""
    from matplotlib.figure import Figure

    mk = [i for i, r in enumerate(rows) if "mergekit_in_GBps" in r]
    w = 0.38 if mk else 0.6
    fig = Figure(figsize=(max(6.0, 1.2 * len(rows) + 2), 4.5), layout="constrained")
    ax = fig.add_subplot()
    bars = ax.bar([i - w / 2 * bool(mk) for i in range(len(rows))], [r["mbmerge_in_GBps"] for r in rows], w,
                  label="mbmerge", color="C0")
    ax.bar_label(bars, fmt="%.3g", fontsize=8)
    if mk:
        bars = ax.bar([i + w / 2 for i in mk], [rows[i]["mergekit_in_GBps"] for i in mk], w, label="mergekit",
                      color="C1")
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
    for i, r in enumerate(rows):
        ax.hlines(r["floor_in_GBps"], i - 0.45, i + 0.45, colors="k", linestyles="--",
                  label="I/O floor (read inputs, write output)" if i == 0 else None)
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)), [r["method"] for r in rows], rotation=20 if len(rows) > 4 else 0)
    ax.set_ylabel("input GB/s (higher is better)")
    ax.set_title(title, fontsize=9)
    fig.legend(loc="outside lower center", ncols=3, fontsize=8)
    fig.savefig(path, dpi=120)
