"""A study's picture: NP against each searched parameter, one panel a parameter (a per-expert one: a
panel an expert), completed trials filled, pruned ones hollow at the NP of the rung they stopped on."""
from pathlib import Path

from ..eval.report import save_figure


def axes_of(record: dict) -> list[tuple[str, int | None]]:
    """(parameter, expert index or None) of each panel."""
    names = list(record.get("grid") or record.get("ranges") or {})
    per_expert = set(record.get("per_expert") or ())
    out = []
    for name in names:
        values = [r["searched"].get(name) for r in record["trials"]]
        width = max((len(x) for x in values if isinstance(x, list)), default=0)
        out += [(name, i) for i in range(width)] if name in per_expert else [(name, None)]
    return out


def plot(record: dict, path: Path) -> Path | None:
    """Write the plot to `path` (its folder made); None when no trial has an NP to show."""
    from matplotlib.figure import Figure
    panels = axes_of(record)
    trials = [r for r in record["trials"] if r["np"] is not None and r["state"] in ("complete", "pruned")]
    if not panels or not trials:
        return None
    fig = Figure(figsize=(3.6 * len(panels), 3.2))
    best = (record.get("best") or {}).get("number")
    for k, (name, i) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        for state, style in (("complete", {"color": "C0"}), ("pruned", {"facecolors": "none", "edgecolors": "C1"})):
            rows = [r for r in trials if r["state"] == state and _numeric(_value(r, name, i))]
            if rows:
                ax.scatter([_value(r, name, i) for r in rows], [r["np"] for r in rows], label=state, **style)
        rows = [r for r in trials if r["number"] == best and _numeric(_value(r, name, i))]
        if rows:
            ax.scatter([_value(rows[0], name, i)], [rows[0]["np"]], marker="*", s=180, color="C3", label="best")
        ax.set_xlabel(name if i is None else f"{name} (expert {i + 1}: {record['validate'][i]})")
        ax.set_ylabel("NP (validation)")
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=8)
    fig.suptitle(f"{record['method']}: normalised performance against each parameter ({record['study']})", fontsize=9)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, Path(path))


def _value(row: dict, name: str, i: int | None):
    x = row["searched"].get(name)
    return x[i] if i is not None and isinstance(x, list) else x


def _numeric(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
