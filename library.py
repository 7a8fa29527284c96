"""The library entries, `mbmerge.merge` and `mbmerge.moe`: a merge (or a Mixture of Experts) as users ask for it,
completed for the engine, which knows no workloads and collects nothing. Domain experts with no base refer to the built-in family (the
mini zoo, eval/zoo.py, trained on first use), and a data-aware method's statistics are collected from
each expert's data (stats/, cached) unless given as folders. It sits above stats/ and eval/, siblings
that do not import each other; the command line, tune and the demo complete their specs here too.
"""
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from . import methods
from .common.errors import BadParameter
from .common.names import DOMAIN_ALIASES, ZOO_SIZES, domain_names, is_domain
from .engine.api import fingerprint as engine_fingerprint
from .engine.api import run, sources
from .engine.device import resolve_device
from .engine.moe.assemble import MoeRun, Routers, assemble
from .engine.moe.inputs import read_inputs
from .engine.moe.recipe import PROMPTED, MoeExpert, MoeRecipe, check_routing
from .engine.output.place import check_location
from .engine.spec import MergeSpec, spec_from


def merge(method: str, *, experts, out, zoo_size: str | None = None, data=None, data_options: dict | None = None,
          **options) -> Path:
    """Merge experts (and a base) into a new model folder, streaming tensor by tensor.

    Args:
        method: a registered method name ("linear", "task_arithmetic", "ties", ...).
        experts: model references: folders, hub ids, or MergeBench domains ("math", "code").
        out: the output folder (refused if it exists and is not empty, unless overwrite=True).
        base: the base model reference; with none and domain experts, the built-in family (the mini
            zoo, of zoo_size: full, or micro for tests; default MBMERGE_ZOO_SIZE, else full).
        keep_base: regex of tensor names copied from the base instead of merged ("" none; None the
            method's or protocol's default, e.g. embeddings for localize_stitch).
        dtype: output dtype of float tensors (default: the base's).
        memory_budget: upper bound of the working memory, e.g. "2GB".
        protocol: "mergebench" sets MergeBench's choices (model-wide ranks, embeddings kept at the
            base, TIES sum aggregation, DARE 1/p rescale); params given here win.
        resume: continue an interrupted merge into `out` of the same recipe and inputs (its
            journal and checksums are checked); False starts over.
        device: where the merge computes: "cpu", "cuda", "cuda:N", or "auto" (CUDA when present).
        kernels, compile: the kernel backend (auto, torch, triton) and whether compiled CPU loops
            may run (default: MBMERGE_KERNELS / MBMERGE_COMPILE, else auto and yes).
        stats_folders: data-aware methods (fisher, regmean, localize_stitch_trained): one statistics
            folder per expert, as `mbmerge stats` writes them.
        data: or one data source per expert (a zoo domain, a JSON/JSONL file, a hub dataset) to collect
            them from, cached (default for domain experts: each one's own domain data).
        data_options: how to read the data: split, data_format, max_length, batch_size, seed, dtype.
        overrides: [(regex, {param: value}), ...]: for tensors whose name matches a regex (the first
            that does), these values replace the parameters, e.g. per layer: [("[.]layers[.]3[.]", {"scale": 0})].
        **params: method parameters, e.g. density=0.2, weights=[0.5, 0.5], scale=1.0.
    Returns:
        the output folder.
    Example:
        >>> mbmerge.merge("ties", base="google/gemma-2-2b", experts=["math", "code"], out="m/", density=0.2)
    """
    return run(complete(spec_from(method, experts, out, **options), zoo_size, data, data_options))


def fingerprint(method: str, *, experts, out, zoo_size: str | None = None, data=None,
                data_options: dict | None = None, **options) -> str:
    """The fingerprint merge() with these arguments would record in its output (engine.fingerprint),
    computed without merging: an output that records it holds this merge."""
    return engine_fingerprint(complete(spec_from(method, experts, out, **options), zoo_size, data, data_options))


def complete(spec: MergeSpec, zoo_size: str | None = None, data=None, data_options: dict | None = None) -> MergeSpec:
    """spec with the built-in family (with_family) and, for a data-aware method given no statistics
    folders, each expert's statistics collected from `data` (default for domain experts: their own)."""
    row = methods.get(spec.method)
    if data and row.data_statistic is None:
        raise BadParameter(f"method {spec.method} uses no data statistics; --stats/--data are for "
                           f"{', '.join(m.name for m in methods.REGISTRY.values() if m.data_statistic)}")
    if data and spec.stats_folders:
        raise BadParameter("give --stats (collected statistics) or --data (collect them), not both")
    spec = with_family(spec, zoo_size)
    if row.data_statistic is None or spec.stats_folders:
        return spec
    folders = statistics_folders(spec, tuple(data) if data else None, data_options or {})
    return replace(spec, stats_folders=tuple(str(f) for f in folders))


def with_family(spec: MergeSpec, zoo_size: str | None = None) -> MergeSpec:
    """spec whose domain experts, given with no base and no family, refer to the mini zoo (built
    into the cache on first use)."""
    if spec.base is not None or spec.family is not None or domain_names(spec.experts) is None:
        return spec
    return replace(spec, family=str(default_family(zoo_size, spec.run.progress)))


def default_family(size: str | None = None, progress: bool = True) -> Path:
    """The mini zoo's Llama family of this size (default MBMERGE_ZOO_SIZE, else full), trained once
    into the cache on first use."""
    from .eval.zoo import build_zoo   # torch training code: imported only when the zoo is needed
    size = size or os.environ.get("MBMERGE_ZOO_SIZE") or "full"
    if size not in ZOO_SIZES:
        raise BadParameter(f"zoo size {size!r}: choose {', '.join(ZOO_SIZES)}")
    return build_zoo("llama", size, progress=progress)


def statistics_folders(spec: MergeSpec, data: tuple[str, ...] | None = None, data_options: dict | None = None
                       ) -> list[Path]:
    """Each expert's statistics folder, collected from its data (by default, for domain experts, its own
    domain), read as data_options say (split, data_format, max_length, batch_size, seed, dtype)."""
    base, experts = sources(spec)
    data = data or default_data(spec)
    if data is None:
        raise BadParameter(f"method {spec.method} needs each expert's {methods.get(spec.method).data_statistic.kind} "
                           f"statistics: --stats DIR,... (from `mbmerge stats`) or --data SOURCE,... to collect them")
    return collect_statistics(spec.method, [s.path for s in experts], data, base=base.path if base else None,
                              params=spec.resolved, device=spec.run.device, memory_budget=spec.run.memory_budget,
                              progress=spec.run.progress, **(data_options or {}))


def collect_statistics(method: str, experts: list[Path], data: list[str], *, base: Path | None = None,
                       params: dict | None = None, progress: bool = True, **options) -> list[Path]:
    """The statistics a data-aware method needs of each expert folder, collected on its data source
    (paired by position) into the cache, or found there. options: device, split, data_format,
    max_length, batch_size, seed, dtype, memory_budget (see mbmerge.stats.collect)."""
    m = methods.get(method)
    if len(data) != len(experts):
        raise BadParameter(f"{len(data)} data source(s) for {len(experts)} experts; give one per expert")
    from .stats.collect import collect_cached, collect_plusplus_cached  # runs models: transformers comes in here
    p = methods.resolve_params(m, len(experts), params or {})
    p = {k: v for k, v in p.items() if k in m.data_statistic.collect}
    if m.data_statistic.kind == "gram_plusplus":       # every expert's Grams depend on the others': collected at once
        if base is None:
            raise BadParameter(f"method {method} carries each expert's data through the merged model, which keeps the "
                               f"base's embeddings: pass --base")
        return collect_plusplus_cached(base, experts, list(data), params=p, progress=progress, **options)
    return [collect_cached(m.data_statistic.kind, Path(e), src, base=base, progress=progress,
                           params={k: v[i] if isinstance(v, list) else v for k, v in p.items()}, **options)
            for i, (e, src) in enumerate(zip(experts, data))]


def default_data(spec: MergeSpec) -> tuple[str, ...] | None:
    """Domain experts' own data: the zoo's domain for the built-in family, MergeBench's `_val` set
    (MergeBench/<domain>_val) for a hub family."""
    names = domain_names(spec.experts)
    if names is None:
        return None
    return tuple(names) if spec.base is None else tuple(f"MergeBench/{d}_val" for d in names)


def moe(recipe: MoeRecipe, out, options: MoeRun = MoeRun(), *, family: Path | None = None, prompts: int = 16,
        allow_all_same: bool = False) -> Path:
    """Build a Mixture of Experts from dense experts (mergekit-moe's recipe, engine/moe/recipe.py): the base's
    attention, norms and embeddings, each expert's MLP, routers from the prompts (stats/routers.py).

    Experts named by MergeBench domain ("math", "coding") with no prompts route by `prompts` examples of their
    domain's validation split; with no base (recipe.base None) they are the experts of `family` (default: the
    built-in family, the mini zoo of $MBMERGE_ZOO_SIZE).
    Example:
        >>> r = mbmerge.engine.moe.recipe.read_recipe("moe.yml")
        >>> mbmerge.moe(r, "moe/")
    """
    check_location(Path(out), options.run.overwrite)          # before the routers' forward passes
    if recipe.base is None:
        family = family or default_family(None, options.run.progress)
    recipe = with_domain_prompts(recipe, family, prompts)
    check_routing(recipe, allow_all_same)
    inputs = read_inputs(recipe)
    if inputs.sources[0].adapter and recipe.gate_mode in PROMPTED:
        raise BadParameter(f"base {recipe.base} has a LoRA adapter: the routers read the base's own weights; fold "
                           f"the adapter in first (mbmerge --method linear --experts {recipe.base} --out DIR)")
    from .stats.routers import degenerate_layers, gate_vectors       # transformers comes in here
    started = time.perf_counter()
    rows = gate_vectors(recipe.gate_mode, inputs.sources[0].path, [(e.positive, e.negative) for e in recipe.gated],
                        seed=options.seed, device=str(resolve_device(options.run.device)), progress=options.run.progress)
    alike = tuple(degenerate_layers(rows)) if recipe.gate_mode in PROMPTED else ()
    if alike:
        print(f"mbmerge: warning: the router rows of {len(alike)} of {inputs.layers} layers are nearly alike (e.g. "
              f"layer {alike[0]}): the prompts may be too similar, and some experts will be underused", file=sys.stderr)
    return assemble(inputs, Routers(rows, time.perf_counter() - started, alike), Path(out), options)


def with_domain_prompts(recipe: MoeRecipe, family: Path | None = None, prompts: int = 16) -> MoeRecipe:
    """recipe whose domain experts without prompts have `prompts` of their domain's validation prompts
    (rendered as the models were trained on them): the zoo's domains for a built-in `family` (whose base and
    experts replace a missing base and the domain names), MergeBench's `_val` sets for a hub base."""
    family = family if recipe.base is None else None

    def filled(e: MoeExpert) -> MoeExpert:
        if not is_domain(e.source) or os.path.exists(e.source):
            return e
        domain = DOMAIN_ALIASES[e.source.lower()]
        data = domain if family else f"MergeBench/{domain}_val"
        if not e.positive:
            from .stats.data import default_template, load_examples, render
            examples = load_examples(data, split="validation", n=prompts)
            e = replace(e, positive=tuple(render(x, default_template(data))[0] for x in examples))
        return replace(e, source=str(family / domain)) if family else e
    return replace(recipe, base=str(family / "base") if family else recipe.base,
                   experts=tuple(map(filled, recipe.experts)), shared_experts=tuple(map(filled, recipe.shared_experts)))
