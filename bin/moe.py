"""`mbmerge moe`: a Mixture of Experts from dense experts, from a mergekit-moe recipe (engine/moe/recipe.py) or
from domain names (`--experts math,coding`, routed by their own validation prompts)."""
from pathlib import Path

import click

from ..common.names import ZOO_SIZES
from ..engine.flags import HOW
from ..engine.inputs.header import dtype_name
from ..engine.moe.recipe import GATE_MODES, MoeExpert, MoeRecipe, is_staged, read_recipe, stage_folders
from .options import listed, spec_option


@click.command("moe")
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(), help="Output folder.")
@click.option("--intermediate-dir", type=click.Path(file_okay=False), help="With a CONFIG of several YAML documents "
              "(merges as named stages, then the MoE): the folder of the stages [default: OUT.stages beside OUT].")
@click.option("--experts", "-e", help="Instead of CONFIG: experts as domain names (math,coding,...) of the built-in "
              "family or of --base's MergeBench family, each routed by its domain's validation prompts.")
@click.option("--base", "-b", help="With --experts: the base model [default: the built-in family's].")
@click.option("--gate-mode", type=click.Choice(GATE_MODES), default="hidden", show_default=True,
              help="With --experts: how routers are made (a CONFIG says its own).")
@click.option("--experts-per-token", "-k", type=click.IntRange(1), default=2, show_default=True,
              help="With --experts: top-k routing.")
@click.option("--architecture", help="With --experts: mixtral, qwen, qwen3 or deepseek [default: the first that fits, "
              "Mixtral preferred].")
@click.option("--dtype", help="With --experts: the output dtype [default: the base's].")
@click.option("--prompts", type=click.IntRange(1), default=16, show_default=True,
              help="Validation prompts per domain expert that has none.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of random gates and of noise_scale.")
@click.option("--out-shard-size", default="5B", show_default=True, help="Bytes of tensors per output shard.")
@click.option("--zoo-size", type=click.Choice(ZOO_SIZES), help="With domain experts and no base: the mini zoo's size "
              "[default: $MBMERGE_ZOO_SIZE, else full].")
@click.option("--i-understand-this-is-not-useful-without-training", "allow_all_same", is_flag=True,
              help="Build it even when every expert is the same model (as mergekit's flag).")
@spec_option(HOW["memory_budget"])
@spec_option(HOW["device"])
@spec_option(HOW["overwrite"])
@spec_option(HOW["resume"])
@click.option("--quiet", "-q", is_flag=True, help="No progress.")
def moe(config, out, intermediate_dir, experts, base, gate_mode, experts_per_token, architecture, dtype, prompts, seed, out_shard_size,
        zoo_size, allow_all_same, memory_budget, device, overwrite, resume, quiet):
    """Build a Mixture of Experts into OUT from CONFIG, a mergekit-moe YAML recipe (base_model, experts with
    positive_prompts, gate_mode, ...), or from --experts. A CONFIG of several YAML documents merges its first
    ones (named stages, as mergekit-multi reads them) before the MoE, its last, which may name them as models."""
    from ..engine.output.place import check_location
    from ..engine.spec import RunOptions
    run = RunOptions(memory_budget=memory_budget, device=device, progress=not quiet, resume=resume,
                     overwrite=overwrite)
    check_location(Path(out), overwrite)
    recipe = _recipe(config, experts, base, gate_mode, experts_per_token, architecture, dtype)
    if config and intermediate_dir is None and is_staged(config):
        intermediate_dir = Path(out).absolute().parent / f"{Path(out).absolute().name}.stages"
    if intermediate_dir is not None:
        recipe = _run_stages(config, recipe, Path(intermediate_dir), run)
    from ..engine.moe.assemble import MoeRun
    from ..library import default_family, moe as build            # torch, from here on
    options = MoeRun(run=run, seed=seed, out_shard_size=out_shard_size)
    family = default_family(zoo_size, not quiet) if recipe.base is None else None
    path = build(recipe, Path(out), options, family=family, prompts=prompts, allow_all_same=allow_all_same)
    if not quiet:
        click.echo(f"MoE written to {path}")


def _recipe(config, experts, base, gate_mode, k, architecture, dtype) -> MoeRecipe:
    """The recipe of CONFIG, else of the --experts options (one way or the other, not both)."""
    ctx = click.get_current_context()
    if config:
        given = [f"--{p.replace('_', '-')}" for p in ("experts", "base", "gate_mode", "experts_per_token",
                                                      "architecture", "dtype")
                 if ctx.get_parameter_source(p) == click.core.ParameterSource.COMMANDLINE]
        if given:
            raise click.UsageError(f"{config} is the recipe; do not also pass {', '.join(given)}")
        return read_recipe(config, last=True)
    if not experts:
        raise click.UsageError("give a mergekit-moe CONFIG, or --experts (domain names: math,coding,...)")
    return MoeRecipe(base=base, experts=tuple(MoeExpert(source=e) for e in listed(experts)), gate_mode=gate_mode,
                     experts_per_token=k, dtype=dtype_name(dtype), architecture=architecture)


def _run_stages(config, recipe: MoeRecipe, folder: Path, run) -> MoeRecipe:
    """The merges before the MoE in CONFIG, each a named stage merged into FOLDER/NAME (skipped where its output
    records its current fingerprint, as `mbmerge --config` runs them); the recipe with their names as folders."""
    from ..engine.recipe.stages import documents, run_stages
    docs = documents(config)
    if len(docs) < 2:
        raise click.UsageError("--intermediate-dir goes with a CONFIG of several YAML documents (merges, then the MoE)")
    names = [d.get("name") for _, d in docs[:-1]]
    if None in names:
        raise click.UsageError(f"{config}: document {docs[names.index(None)][0]} needs a name: the merges before the "
                               f"MoE are stages, which the MoE names as its models")
    from .. import library                              # torch, from here on
    run_stages(config, intermediate_dir=folder, until=len(docs) - 1, lazy=not run.overwrite, merge=library.merge,
               fingerprint=library.fingerprint, memory_budget=run.memory_budget, device=run.device,
               progress=run.progress, resume=run.resume, overwrite=run.overwrite)
    return stage_folders(recipe, {n: folder / n for n in names})
