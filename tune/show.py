"""A study's picture: NP against each searched parameter, one panel a parameter (a per-expert one: a
panel an expert; a per-layer one: a panel a group of layers, and expert), completed trials filled, pruned
ones hollow at the NP of the rung they stopped on."""
from pathlib import Path

from ..eval.report import save_figure

COLUMNS = 5     # panels a row (a per-layer search has a panel for each group and expert)


def axes_of(record: dict) -> list[tuple[str, tuple]]:
    """(parameter, the indices of its value: () for one value, (expert,), (group,) or (group, expert)) of each
    panel."""
    names = list(record.get("grid") or record.get("ranges") or {})
    out = []
    for name in names:
        example = next((r["searched"][name] for r in record["trials"] if isinstance(r["searched"].get(name), list)),
                       None)
        out += [(name, at) for at in _places(example)] if example is not None else [(name, ())]
    return out


def _places(value) -> list[tuple]:
    """The index paths of a nested list's numbers: [[a, b], [c, d]] -> (0, 0), (0, 1), (1, 0), (1, 1)."""
    if not isinstance(value, list):
        return [()]
    return [(i, *rest) for i, x in enumerate(value) for rest in _places(x)]


def plot(record: dict, path: Path) -> Path | None:
    """Write the plot to `path` (its folder made); None when no trial has an NP to show."""
    from matplotlib.figure import Figure
    panels = axes_of(record)
    trials = [r for r in record["trials"] if r["np"] is not None and r["state"] in ("complete", "pruned")]
    if not panels or not trials:
        return None
    cols = min(len(panels), COLUMNS)
    rows_of_panels = -(-len(panels) // cols)
    fig = Figure(figsize=(3.6 * cols, 3.2 * rows_of_panels))
    best = (record.get("best") or {}).get("number")
    for k, (name, i) in enumerate(panels):
        ax = fig.add_subplot(rows_of_panels, cols, k + 1)
        for state, style in (("complete", {"color": "C0"}), ("pruned", {"facecolors": "none", "edgecolors": "C1"})):
            rows = [r for r in trials if r["state"] == state and _numeric(_value(r, name, i))]
            if rows:
                ax.scatter([_value(r, name, i) for r in rows], [r["np"] for r in rows], label=state, **style)
        rows = [r for r in trials if r["number"] == best and _numeric(_value(r, name, i))]
        if rows:
            ax.scatter([_value(rows[0], name, i)], [rows[0]["np"]], marker="*", s=180, color="C3", label="best")
        ax.set_xlabel(_label(record, name, i))
        ax.set_ylabel("NP (validation)")
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=8)
    fig.suptitle(f"{record['method']}: normalised performance against each parameter ({record['study']})", fontsize=9)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, Path(path))


def _label(record: dict, name: str, at: tuple) -> str:
    """The panel's parameter, and which group of layers and which expert it is of."""
    per_expert = name in (record.get("per_expert") or ())
    group = at[0] if record.get("per_layer") else None
    expert = at[-1] if per_expert and at else None
    words = ([f"layers group {group + 1}"] if group is not None else []) + \
            ([f"expert {expert + 1}: {record['validate'][expert]}"] if expert is not None else [])
    return f"{name} ({', '.join(words)})" if words else name


def _value(row: dict, name: str, at: tuple):
    x = row["searched"].get(name)
    for i in at:
        if not isinstance(x, list):
            return None
        x = x[i]
    return x


def _numeric(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def plot_front(record: dict, path: Path) -> Path | None:
    """The first two objectives of every completed trial, the Pareto front joined and the best starred;
    None for a study of one objective or with no completed trial."""
    from matplotlib.figure import Figure
    names = record.get("objectives") or []
    if len(names) < 2:
        return None
    x_name, y_name = names[:2]
    done = [r for r in record["trials"] if r["state"] == "complete"
            and all(_numeric(r["values"].get(k)) for k in (x_name, y_name))]
    if not done:
        return None
    fig = Figure(figsize=(5.2, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter([r["values"][x_name] for r in done], [r["values"][y_name] for r in done], color="C0", alpha=0.5,
               label="trials")
    front = sorted((r for r in done if r["number"] in set(record.get("front", []))), key=lambda r: r["values"][x_name])
    ax.plot([r["values"][x_name] for r in front], [r["values"][y_name] for r in front], "o-", color="C1",
            label="Pareto front")
    best = [r for r in done if r["number"] == (record.get("best") or {}).get("number")]
    if best:
        ax.scatter([best[0]["values"][x_name]], [best[0]["values"][y_name]], marker="*", s=220, color="C3",
                   label="best", zorder=3)
    if record.get("max_forgetting") is not None and y_name == "forgetting":
        ax.axhline(record["max_forgetting"], color="gray", linestyle="--", label="--max-forgetting")
    ax.set_xlabel("NP (validation)" if x_name == "np" else f"{x_name} (validation)")
    ax.set_ylabel(f"{y_name} (validation)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{record['method']}: {len(done)} trials, {len(front)} on the front", fontsize=9)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, Path(path))
