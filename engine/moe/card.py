"""A MoE's model card (README.md) and record (mbmerge.json): its inputs, architecture, routing, the recipe
that rebuilds it and the command that runs it."""
import json
import shlex
from pathlib import Path

RECIPE_FILE = "mbmerge_moe_config.yml"     # the recipe beside the model, as mergekit writes mergekit_moe_config.yml


def command(out: Path, seed: int, shard_size: int | str) -> str:
    """The command that rebuilds it from the recipe written beside it (prompts and models resolved)."""
    extra = (f" --seed {seed}" if seed else "") + (f" --out-shard-size {shard_size}" if shard_size != "5B" else "")
    return f"mbmerge moe {shlex.quote(str(Path(out) / RECIPE_FILE))} --out {shlex.quote(str(out))}{extra}"


def write_moe_card(folder: Path, record: dict, recipe: str) -> None:
    (folder / "mbmerge.json").write_text(json.dumps(record, indent=2) + "\n")
    inputs = [record["base"], *record["experts"], *record["shared_experts"]]
    rows = "\n".join(f"| {s['role']} | `{s['ref']}` | {s['revision'] or 'local'} |" for s in inputs)
    base_line = f"base_model: {record['base']['ref']}\n" if record["base"]["revision"] else ""
    shared = f", {len(record['shared_experts'])} shared" if record["shared_experts"] else ""
    degenerate = record["degenerate_router_layers"]
    warning = (f"\nRouting: the router rows of layer(s) {', '.join(map(str, degenerate))} are nearly alike (condition "
               f"number above 5): the prompts may be too similar, and some experts will be underused.\n"
               if degenerate else "")
    (folder / "README.md").write_text(
        f"---\n{base_line}library_name: transformers\ntags:\n- moe\n- merge\n- mbmerge\n---\n\n"
        f"# Mixture of Experts\n\nBuilt with mbmerge {record['mbmerge_version']} from {len(record['experts'])} "
        f"dense experts{shared}: a **{record['architecture']}** model routing each token to "
        f"{record['experts_per_token']} of them, routers from `{record['gate_mode']}` (seed {record['seed']}), "
        f"in {record['wall_seconds']:.1f} s ({record['router_seconds']:.1f} s of it the routers).\n\n"
        f"## Inputs\n\n| role | model | revision |\n|---|---|---|\n{rows}\n\n"
        f"Attention, norms, embeddings and head are the base's; each expert brings its MLP. Output dtype: "
        f"{record['dtype']}.\n{warning}\n"
        f"## Recipe\n\nAs `{record['recipe_file']}` beside this card says:\n\n```yaml\n{recipe.rstrip()}\n```\n\n"
        f"Reproduce with:\n\n```\n{record['command']}\n```\n")
