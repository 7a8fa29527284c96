"""The method table: one row per method (methods/contract.py says what a row holds), its
parameters, and the benchmark protocols. Adding a method touches its own module and one row here.
It imports no torch: the command line reads it to build its options and help, so a row points at its
functions through Lazy modules, imported on first call (editors and type checkers see the real ones).
"""
from dataclasses import replace
from typing import TYPE_CHECKING

from ..common.errors import BadParameter
from ..common.roles import EMBEDDINGS_AND_HEAD
from .contract import NO_TRIM, REQUIRED, Calibrated, DataStatistic, Lazy, Method, Param, Trim

if TYPE_CHECKING:
    from . import (agent_merging, dare_drop, data_aware, della_magprune, fused, fusion_threshold, hypersphere,
                   interpolation, masks, max_magnitude, model_breadcrumbs, near_swap, pass_through,
                   select_calculate_erase, svd, ties_merging)
else:
    (agent_merging, dare_drop, data_aware, della_magprune, fused, fusion_threshold, hypersphere, interpolation, masks,
     max_magnitude, model_breadcrumbs, near_swap, pass_through, select_calculate_erase, svd, ties_merging) = map(
        Lazy, ["agent_merging", "dare_drop", "data_aware", "della_magprune", "fused", "fusion_threshold",
               "hypersphere", "interpolation", "masks", "max_magnitude", "model_breadcrumbs", "near_swap",
               "pass_through", "select_calculate_erase", "svd", "ties_merging"])

WEIGHTS = Param("weights", 1.0, "per-expert weight w_i", per_expert=True)
DENSITY = Param("density", 0.2, "fraction rho_i of each delta kept", per_expert=True, fraction=True)
SCALE = Param("scale", 1.0, "lambda, the scale on the merged delta (mergekit: lambda)", aliases=("--lambda",))
CONSENSUS = Param("consensus", "sum", "sign election: sum (by mass) or count (by vote)", choices=("sum", "count"))
AGGREGATE = Param("aggregate", "mean", "agreeing deltas: mean (TIES paper, mergekit normalize) "
                  "or sum (MergeBench)", choices=("mean", "sum"))
RESCALE = Param("rescale", "inverse", "dropped deltas: inverse (1/p, paper) | l1 (mergekit) | none",
                choices=("inverse", "l1", "none"))
SEED = Param("seed", 0, "seed of the counter-based keep masks")
GAMMA = Param("gamma", 0.01, "breadcrumbs: fraction of the largest |d_i| dropped as outliers", per_expert=True)
EPSILON = Param("epsilon", 0.15, "della: keep probability spread, rho_i -+ eps_i from smallest to largest "
                "|d_i| in a row", per_expert=True)
K = Param("k", 2, "consensus: keep entries that at least k TALL masks select")
TALL_LAMBDA = Param("tall_lambda", 0.2, "consensus: TALL mask |e_i| >= lambda_i |tau - e_i|", per_expert=True)
MTL = Param("mtl", "ta", "consensus: the multi-task vector tau, task arithmetic or TIES", choices=("ta", "ties"))
SPARSITY = Param("sparsity", 0.1, "localize_stitch: fraction of each delta kept by its mask",
                 per_expert=True, fraction=True)
FILTER_WISE = Param("filter_wise", False, "model_stock: one interpolation t per row (mergekit filter_wise)")
PASSTHROUGH_SCALE = Param("scale", 1.0, "passthrough: the factor on the model's tensors (mergekit: scale)")
SLERP_T = Param("t", 0.5, "slerp: interpolation factor, 0 = base, 1 = expert")
NEARSWAP_T = Param("t", 1e-4, "nearswap: |x - b| up to which the expert's value is taken; farther, b moves t "
                   "toward it")
SELECT_TOPK = Param("select_topk", 1.0, "sce: fraction of the entries (of nonzero variance across the experts) "
                    "kept, the most varying")
NORMALIZE_WEIGHTS = Param("normalize_weights", True, "multislerp: divide the weights by their sum")
EPS = Param("eps", 1e-8, "multislerp: added to each |d_i| before dividing by it")
NUSLERP_FLATTEN = Param("nuslerp_flatten", True, "nuslerp: slerp whole tensors (else rows, or columns with "
                        "--nuslerp-row-wise)")
NUSLERP_ROW_WISE = Param("nuslerp_row_wise", False, "nuslerp, without flatten: slerp columns (vectors along the "
                         "first dimension) instead of rows")
MAX_ITER = Param("max_iter", 10, "karcher: at most this many Riemannian steps")
TOL = Param("tol", 1e-5, "karcher: stop when the step is shorter; inputs of smaller norm are left out")
RAM_EPSILON = Param("epsilon", 1e-5, "ram: |d_i| above which expert i counts as changing an entry")
RAM_R = Param("r", 0.1, "ramplus_tl: the gain 1 + r clamp(rho_i, 0, alpha) on expert i's unique entries")
RAM_ALPHA = Param("alpha", 0.2, "ramplus_tl: the cap on rho_i, expert i's shared over unique entries")
COMMON_FRACTION = Param("common_fraction", 0.8, "iso_cts: fraction f of the rank given to the common subspace",
                        fraction=True)
STEPS = Param("steps", 400, "wudi, doge_ta: Adam steps on each 2-D tensor (FusionBench's configs: 400)", minimum=0)
WUDI_LR = Param("lr", 1e-5, "wudi: Adam's learning rate (FusionBench: 1e-5); doge_ta: its Adam's (1e-4); "
                "localize_stitch_trained: the step on its mask logits (1e8)", minimum=0)   # the shared --lr's help
QUANTILE = Param("quantile", 0.99, "tatr: entries whose conflict sum_{i!=j} |d_i||d_j| is at or above its q-quantile "
                 "are dropped (FusionBench: 0.99)", fraction=True)
TATR_KEEP_TIES = Param("keep_ties", True, "tatr: drop every entry tied at the quantile (FusionBench: Omega < t "
                       "kept) instead of exactly n - floor(q n) entries (ties by position)")
DOGE_DENSITY = Param("density", 0.3, "doge_ta: fraction of each expert's |d_i| kept, ranked over the whole model "
                     "(FusionBench: K 30)", per_expert=True, fraction=True)
SUBSPACE = Param("subspace", 6, "doge_ta: the shared subspace holds floor(r / subspace) left singular vectors",
                 minimum=1)
NORM_SCALE = Param("norm_scale", 0.07, "doge_ta: lam_i = norm_scale / ||d_i||_F per tensor (FusionBench: lamda)")
DOGE_LR = Param("lr", 1e-4, "doge_ta: Adam's learning rate (FusionBench: 1e-4)", minimum=0)
DOGE_KEEP_TIES = Param("keep_ties", True, "doge_ta: keep every |d_i| tied at the threshold (FusionBench: kthvalue, "
                       "then >=)")
adaptive_projection, trust_region, wudi_merging = map(Lazy, ["adaptive_projection", "trust_region", "wudi_merging"])
# collected with the data statistics (mbmerge stats), not used by apply
SAMPLES = Param("samples", 1000, "statistics: examples of each expert's data (MergeBench: 1000)")
FISHER_LABELS = Param("fisher", "sampled", "fisher: labels sampled from the expert (true Fisher) or the gold "
                      "ones (empirical)", choices=("sampled", "empirical"))
REDUCTION = Param("reduction", 0.5, "regmean: alpha, the factor on the Grams' off-diagonal entries "
                  "(MergeBench's RegMean 0.5, RegMean++ 0.1)")
REDUCTION_PP = Param("reduction", 0.1, "regmean_plusplus: alpha on the Grams' off-diagonal entries (MergeBench's "
                     "RegMean++ 0.1)")
SIGMOID_BIAS = Param("sigmoid_bias", 3.0, "localize_stitch_trained: mask logits start at +-this")
MASK_LR = Param("lr", 1e8, "localize_stitch_trained: step on the mask logits (raw gradients are tiny)")
EPOCHS = Param("epochs", 1, "localize_stitch_trained: passes over the data, one mask update each")
L1 = Param("l1", 0.0, "localize_stitch_trained: L1 pull of the masks towards 0 (MergeBench: 0)")


def _normalize(default: bool) -> Param:
    return Param("normalize", default, "divide by the sum of weights")


def _scope(default: str) -> Param:
    return Param("sparsify_scope", default, "magnitude ranks over each tensor (mergekit) or over the "
                 "whole model (TIES paper, MergeBench)", choices=("tensor", "model"))


SCOPE = _scope("tensor")
KEEP_TIES = Param("keep_ties", False, "magnitude ranks keep every entry tied at a threshold (the TIES and "
                  "MergeBench code: kthvalue, then >=) instead of exactly k (ties broken by position)")

# mergekit 0.1.5's parameters and defaults (its merge_methods/registry.py); the generalized task
# arithmetic family shares these
_GTA = {"weight": REQUIRED, "density": 1.0, "lambda": 1.0, "int8_mask": False}
# MergeBench's tuning grids, as the tuning scripts of a public fork of it have them. DARE's p is read as
# the drop rate (density 1 - p would keep 70-90%, far from MergeBench's own example p 0.9).
_DROP_GRID = {"density": [0.1, 0.2, 0.3], "scale": [0.4, 0.6, 0.8]}
# `mbmerge demo`: MergeBench's example settings (its scripts/merge.sh: TA lam 0.4, TIES K 0.3 lam 0.4,
# DARE p 0.9 lam 0.4, Consensus lam 0.4, dataless L&S sparsity 0.1), under --protocol mergebench; other
# sums of deltas get lam 0.4 too, so that no method is handicapped by summing five full deltas.
_DEMO_TRIM = {"density": 0.3, "scale": 0.4}
_DEMO_DROP = {"density": 0.1, "scale": 0.4}
_BENCH_TRIM = {"weights": 1.0, "density": 0.2}

# -- the task-arithmetic family (methods/task_vectors.py): out = b + lam * m over e_i = w_i trim_i(d_i), m their sum
# or (elect "sign") their disjoint merge. A member's row names its trim and election; its module holds the trim.
TOP_K = Trim("magnitude", torch=ties_merging.trim, fused=ties_merging.fused_trim, ranks=ties_merging.ranks)
BAND = Trim("magnitude", torch=model_breadcrumbs.trim, fused=model_breadcrumbs.fused_trim,
            ranks=model_breadcrumbs.ranks)
DROP = Trim("random", torch=dare_drop.trim, fused=dare_drop.fused_trim, reduce=dare_drop.rescale_gains)
MAGPRUNE = Trim("random", torch=della_magprune.trim, fused=della_magprune.fused_trim,
                reduce=della_magprune.rescale_gains)

REGISTRY = {m.name: m for m in [
    # -- the task-arithmetic family: linear, task_arithmetic, ties, dare_*, breadcrumbs*, della*
    Method(name="linear", summary="weighted average of the experts (model soup)",
           paper="https://arxiv.org/abs/2203.05482", params=(WEIGHTS, _normalize(True)), trim=NO_TRIM,
           needs_base=False, mergekit={"weight": REQUIRED, "normalize": True}, bench={"weights": 1.0}),
    Method(name="task_arithmetic", summary="b + lam * sum_i w_i d_i", paper="https://arxiv.org/abs/2212.04089",
           params=(WEIGHTS, SCALE, _normalize(False)), trim=NO_TRIM,
           mergekit={**_GTA, "normalize": False, "rescale": False},
           grid={"scale": [0.2, 0.4, 0.6, 0.8, 1.0]}, demo={"scale": 0.4}, bench={"weights": 1.0}),
    Method(name="ties", summary="trim to top-rho magnitudes, elect sign, disjoint merge",
           paper="https://arxiv.org/abs/2306.01708",
           params=(WEIGHTS, DENSITY, SCALE, CONSENSUS, AGGREGATE, SCOPE, KEEP_TIES), trim=TOP_K, elect="sign",
           mergekit={**_GTA, "normalize": True, "rescale": False},
           grid={"density": [0.1, 0.2, 0.3], "scale": [0.4, 0.6, 0.8]}, demo=_DEMO_TRIM, bench=_BENCH_TRIM),
    Method(name="dare_linear", summary="random drop with rescale, then task arithmetic",
           paper="https://arxiv.org/abs/2311.03099",
           params=(WEIGHTS, DENSITY, SCALE, _normalize(False), RESCALE, SEED), trim=DROP,
           mergekit={**_GTA, "normalize": False, "rescale": True}, grid=_DROP_GRID, demo=_DEMO_DROP,
           bench=_BENCH_TRIM),
    Method(name="dare_ties", summary="random drop with rescale, then TIES sign election",
           paper="https://arxiv.org/abs/2311.03099",
           params=(WEIGHTS, DENSITY, SCALE, CONSENSUS, AGGREGATE, RESCALE, SEED), trim=DROP, elect="sign",
           mergekit={**_GTA, "normalize": False, "rescale": True}, grid=_DROP_GRID, demo=_DEMO_DROP,
           bench=_BENCH_TRIM),
    Method(name="breadcrumbs", summary="drop the top-gamma outliers and the smallest |d|, keep rho; then task "
           "arithmetic", paper="https://arxiv.org/abs/2312.06795",
           params=(WEIGHTS, DENSITY, GAMMA, SCALE, _normalize(False), SCOPE, KEEP_TIES), trim=BAND,
           mergekit={**_GTA, "gamma": 0.01, "normalize": False, "rescale": False}, demo=_DEMO_TRIM),
    Method(name="breadcrumbs_ties", summary="drop the top-gamma outliers and the smallest |d|, keep rho; then "
           "TIES sign election", paper="https://arxiv.org/abs/2312.06795",
           params=(WEIGHTS, DENSITY, GAMMA, SCALE, CONSENSUS, AGGREGATE, SCOPE, KEEP_TIES), trim=BAND, elect="sign",
           mergekit={**_GTA, "gamma": 0.01, "normalize": False, "rescale": False},
           demo=_DEMO_TRIM, bench={**_BENCH_TRIM, "gamma": 0.01}),
    Method(name="della", summary="random drop, keep probability rising with |d| rank in the row; then TIES "
           "sign election", paper="https://arxiv.org/abs/2406.11617",
           params=(WEIGHTS, DENSITY, EPSILON, SCALE, CONSENSUS, AGGREGATE, RESCALE, SEED), trim=MAGPRUNE,
           elect="sign", span="row", mergekit={**_GTA, "epsilon": 0.15, "normalize": True, "rescale": True},
           demo=_DEMO_TRIM, bench={**_BENCH_TRIM, "epsilon": 0.1}),
    Method(name="della_linear", summary="random drop, keep probability rising with |d| rank in the row; then "
           "task arithmetic", paper="https://arxiv.org/abs/2406.11617",
           params=(WEIGHTS, DENSITY, EPSILON, SCALE, _normalize(False), RESCALE, SEED), trim=MAGPRUNE, span="row",
           mergekit={**_GTA, "epsilon": 0.15, "normalize": False, "rescale": True}, demo=_DEMO_TRIM,
           bench={**_BENCH_TRIM, "epsilon": 0.1}),
    # -- other element-wise methods: passthrough, magmax
    Method(name="passthrough", summary="one model's tensors as they are (times scale): frankenmerges with slices",
           paper="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
           params=(PASSTHROUGH_SCALE,), apply=pass_through.apply, needs_base=False,
           max_experts=1, mergekit={"scale": 1.0}),
    Method(name="magmax", summary="per element the delta of largest magnitude: b + lam * d_argmax",
           paper="https://arxiv.org/abs/2407.06322", params=(SCALE,), apply=max_magnitude.apply, bench={}),
    # -- whole-tensor statistics: model_stock, slerp, tsv, iso_c, iso_cts
    Method(name="model_stock", summary="t * mean_i x_i + (1 - t) b, t from the mean pairwise cosine of the deltas",
           paper="https://arxiv.org/abs/2403.19522", params=(FILTER_WISE,),
           apply=interpolation.apply_model_stock, reduce=interpolation.model_stock_cosine, fused=fused.model_stock,
           span="row", min_experts=2, mergekit={"filter_wise": False}, bench={}),
    Method(name="slerp", summary="spherical interpolation from the base (t=0) to one expert (t=1), whole tensors",
           paper="https://dl.acm.org/doi/10.1145/325165.325242", params=(SLERP_T,),
           apply=interpolation.apply_slerp, reduce=interpolation.slerp_coefficients, fused=fused.slerp,
           min_experts=1, max_experts=1, mergekit={"t": REQUIRED}, bench={"t": 0.5}),
    Method(name="tsv", summary="task singular vectors: top r/T triplets per task, orthogonalised",
           paper="https://arxiv.org/abs/2412.00081", params=(SCALE,), apply=svd.apply_tsv,
           span="tensor", keep_base=EMBEDDINGS_AND_HEAD, bench={}),
    Method(name="iso_c", summary="SVD of the summed deltas with a flat (isotropic) spectrum",
           paper="https://arxiv.org/abs/2502.04959", params=(SCALE,), apply=svd.apply_iso_c,
           span="tensor", keep_base=EMBEDDINGS_AND_HEAD, bench={}),
    Method(name="iso_cts", summary="Iso-C on a common subspace plus per-task orthogonal subspaces",
           paper="https://arxiv.org/abs/2502.04959", params=(SCALE, COMMON_FRACTION),
           apply=svd.apply_iso_cts, span="tensor", keep_base=EMBEDDINGS_AND_HEAD),
    Method(name="wudi", summary="per 2-D tensor, Adam steps to the delta least interfering with each task's "
           "inputs, proxied by its d_i", paper="https://arxiv.org/abs/2503.08099", params=(SCALE, STEPS, WUDI_LR),
           apply=wudi_merging.apply, span="tensor", keep_base=EMBEDDINGS_AND_HEAD),
    Method(name="doge_ta", summary="task arithmetic on top-density deltas plus a correction from projected Adam "
           "steps outside the tasks' shared subspace", paper="https://arxiv.org/abs/2501.01230",
           params=(NORM_SCALE, DOGE_DENSITY, SUBSPACE, STEPS, DOGE_LR, _scope("model"), DOGE_KEEP_TIES),
           apply=adaptive_projection.apply, ranks=adaptive_projection.ranks, trim=Trim("magnitude"), span="tensor",
           keep_base=EMBEDDINGS_AND_HEAD + r"|norm|\.bias$"),   # FusionBench merges 2-D weights only
    # -- more of mergekit 0.1.5's methods: nearswap, sce, multislerp, nuslerp, karcher, ram, ramplus_tl
    Method(name="nearswap", summary="the expert where |x - b| <= t, elsewhere b moved t toward it",
           paper="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001", params=(NEARSWAP_T,),
           apply=near_swap.apply, max_experts=1, mergekit={"t": REQUIRED}, bench={"t": 1e-4}),
    Method(name="sce", summary="select the most varying entries, weight experts by mean square, erase minority "
           "signs", paper="https://arxiv.org/abs/2408.07990", params=(SELECT_TOPK,),
           apply=select_calculate_erase.apply, reduce=select_calculate_erase.sce_statistics,
           mergekit={"int8_mask": False, "select_topk": 1.0}, bench={"select_topk": 0.5}),
    Method(name="multislerp", summary="barycentric slerp: the weighted mean of the unit deltas at the weighted mean "
           "norm", paper="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
           params=(WEIGHTS, NORMALIZE_WEIGHTS, EPS), apply=hypersphere.apply_multislerp,
           reduce=hypersphere.multislerp_coefficients,
           mergekit={"weight": REQUIRED, "normalize_weights": True, "eps": 1e-8}, bench={"weights": 1.0}),
    Method(name="nuslerp", summary="slerp between two experts' deltas at t = w_2 / (w_1 + w_2): whole tensors, rows "
           "or columns", paper="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
           params=(WEIGHTS, NUSLERP_FLATTEN, NUSLERP_ROW_WISE),
           apply=hypersphere.apply_nuslerp, reduce=hypersphere.nuslerp_coefficients,
           span="row", min_experts=2, max_experts=2,
           mergekit={"weight": REQUIRED, "nuslerp_row_wise": False, "nuslerp_flatten": True}, bench={"weights": 1.0}),
    Method(name="karcher", summary="the Karcher (Riemannian) mean of the inputs' directions at their mean norm",
           paper="https://arxiv.org/abs/2603.04972", params=(MAX_ITER, TOL),
           apply=hypersphere.apply_karcher, reduce=hypersphere.karcher_coefficients,
           needs_base=False, mergekit={"max_iter": 10, "tol": 1e-5}, bench={}),
    Method(name="ram", summary="deltas one expert made kept whole, shared ones averaged over those that made them",
           paper="https://arxiv.org/abs/2601.13572", params=(RAM_EPSILON,),
           apply=agent_merging.apply_ram, mergekit={"epsilon": 1e-5}, bench={}),
    Method(name="ramplus_tl", summary="ram with unique deltas scaled up by each expert's shared/unique ratio in the "
           "tensor", paper="https://arxiv.org/abs/2601.13572", params=(RAM_R, RAM_ALPHA, RAM_EPSILON),
           apply=agent_merging.apply_ramplus, reduce=agent_merging.ramplus_gains,
           mergekit={"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}, bench={}),
    Method(name="arcee_fusion", summary="the expert's changes where their importance |d| KL(row) is an outlier "
           "(above Q2 + 1.5 IQR)", paper="https://arcee.ai", params=(),
           apply=fusion_threshold.apply, reduce=fusion_threshold.threshold,
           span="row", max_experts=1, mergekit={}, bench={}),
    # -- masks
    Method(name="consensus", summary="TALL masks; keep what at least k tasks claim of the multi-task vector",
           paper="https://arxiv.org/abs/2405.07813",
           params=(WEIGHTS, SCALE, K, TALL_LAMBDA, MTL, DENSITY, CONSENSUS, AGGREGATE, SCOPE, KEEP_TIES),
           apply=masks.consensus, ranks=masks.consensus_ranks, fused=fused.consensus, trim=Trim("mask"),
           grid={"tall_lambda": [0.3, 0.5, 0.7], "scale": [0.4, 0.6, 0.8]}, demo={"scale": 0.4}, bench={}),
    Method(name="localize_stitch", summary="dataless Localize-and-Stitch: top-k masks per expert, overlaps averaged",
           paper="https://arxiv.org/abs/2408.13656", params=(SPARSITY, _scope("model"), KEEP_TIES),
           apply=masks.localize_stitch, ranks=masks.localize_ranks,
           fused=fused.localize_stitch, trim=Trim("magnitude"), keep_base=EMBEDDINGS_AND_HEAD,
           grid={"sparsity": [0.1, 0.2, 0.3, 0.4]}, bench={}),
    Method(name="tatr", summary="task arithmetic without the entries where the experts' changes collide most "
           "(zero-shot trust region: top 1-q of sum_(i!=j) |d_i||d_j|)",
           paper="https://openreview.net/forum?id=q3ztjJRQuJ",
           params=(SCALE, QUANTILE, _scope("model"), TATR_KEEP_TIES),
           apply=trust_region.apply, ranks=trust_region.ranks, score=trust_region.conflict, trim=Trim("mask"),
           demo={"scale": 0.4}),
    # -- data-aware: statistics of each expert on its own data (mbmerge stats)
    Method(name="fisher", summary="sum_i w_i F_i x_i / sum_i w_i F_i, F_i the diagonal Fisher of expert i on its "
           "data", paper="https://arxiv.org/abs/2111.09832", params=(WEIGHTS, SAMPLES, FISHER_LABELS),
           apply=data_aware.fisher, needs_base=False, keep_base=EMBEDDINGS_AND_HEAD,
           data_statistic=DataStatistic("fisher", whole=False, every_tensor=True, collect=("samples", "fisher"))),
    Method(name="regmean", summary="per linear layer the weights minimising the experts' output gaps on their "
           "data (Grams)", paper="https://arxiv.org/abs/2212.09849", params=(REDUCTION, SAMPLES),
           apply=data_aware.regmean, reduce=data_aware.regmean_projections,
           span="row", needs_base=False, keep_base=EMBEDDINGS_AND_HEAD,
           data_statistic=DataStatistic("gram", whole=True, every_tensor=False, collect=("samples",))),
    Method(name="regmean_plusplus", summary="RegMean with each expert's Grams taken on its data as the merged "
           "model carries it, layer by layer", paper="https://github.com/uiuctml/MergeBench/pull/8",
           params=(REDUCTION_PP, SAMPLES), apply=data_aware.regmean,
           reduce=data_aware.regmean_projections, span="row", needs_base=False,
           keep_base=EMBEDDINGS_AND_HEAD,
           data_statistic=DataStatistic("gram_plusplus", whole=True, every_tensor=False,
                                        collect=("samples", "reduction"))),
    Method(name="localize_stitch_trained", summary="Localize-and-Stitch with masks trained on each expert's data, "
           "overlaps averaged", paper="https://arxiv.org/abs/2408.13656",
           params=(SPARSITY, SIGMOID_BIAS, MASK_LR, EPOCHS, L1, SAMPLES),
           apply=data_aware.localize_stitch_trained, keep_base=EMBEDDINGS_AND_HEAD,
           data_statistic=DataStatistic("mask", whole=False, every_tensor=True,
                                        collect=("sparsity", "sigmoid_bias", "lr", "epochs", "l1", "samples")),
           # MergeBench's lr 1e8 acts on a sum of raw gradients over ~500 steps of a 2B model; one step of 1e8
           # on the zoo's mean gradient overshoots (math expert: task loss 0.32 -> 1.60 against the dataless
           # mask), 1e6 for 3 epochs lowers it (0.32 -> 0.29) and keeps ~10% of entries
           demo={"lr": 1e6, "epochs": 3}),
]}

# A benchmark's choices at once; user parameters win. keep_base: the default --keep-base.
PROTOCOLS = {
    "mergebench": {"sparsify_scope": "model", "aggregate": "sum", "rescale": "inverse", "keep_ties": True,
                   "keep_base": EMBEDDINGS_AND_HEAD},
}


def get(name: str) -> Method:
    """The registry row for `name`; BadParameter naming the known methods otherwise."""
    if name not in REGISTRY:
        raise BadParameter(f"unknown method {name!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def collection_params(kind: str) -> dict[str, Param]:
    """The parameters of collecting data statistics of KIND (fisher, gram, mask), by name."""
    return {p.name: p for m in REGISTRY.values() if m.data_statistic and m.data_statistic.kind == kind
            for p in m.params if p.name in m.data_statistic.collect}


def protocol_defaults(method: Method, protocol: str | None) -> dict:
    """The protocol's parameter choices that apply to `method` (and its keep_base, if any)."""
    if protocol is None:
        return {}
    if protocol not in PROTOCOLS:
        raise BadParameter(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    names = {p.name for p in method.params} | {"keep_base"}
    return {k: v for k, v in PROTOCOLS[protocol].items() if k in names}


# Post-steps any method can take (--calibrate NAME): the step on each merged tensor and its parameters
SVC_ALPHA = Param("svc_alpha", 0.1, "svc: floor alpha on each task's projection coefficient s_r^i; gamma_r = K / "
                  "sum_i max(alpha, s_r^i) (FusionBench: 0.1 for task arithmetic, TIES, DARE, Iso-C; 1.0 for TSV)")
CALIBRATIONS = {"svc": (Lazy("calibration").apply_svc, (SVC_ALPHA,))}


def calibrated(method: Method, calibrate: str | None) -> Method:
    """method's row with the post-step `calibrate` after its apply, on whole tensors (span tensor, no fused
    kernel), and the step's parameters; the row itself for None. BadParameter for an unknown step."""
    if calibrate is None:
        return method
    if calibrate not in CALIBRATIONS:
        raise BadParameter(f"calibrate {calibrate!r} is not known; choose {', '.join(CALIBRATIONS)}")
    if not method.needs_base:
        raise BadParameter(f"calibrate {calibrate}: it rescales the merged delta from the base, and method "
                           f"{method.name} reads no base (use task_arithmetic with --normalize instead)")
    step, params = CALIBRATIONS[calibrate]
    return replace(method, apply=Calibrated(method.apply, step), fused=None, span="tensor",
                   params=method.params + params)
