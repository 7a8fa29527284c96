"""The fused paths of the element-wise methods (and of model_stock's and slerp's interpolations): one
adapter per method maps its parameters and statistics to one kernels.* call (Triton on the GPU,
compiled C on the CPU) that reads each input once, in its stored dtype, and writes the merged chunk
once, in out_dtype. The torch methods stay the references; `dispatch.merge_chunk` calls an adapter
when `kernels.fused(device)`; an adapter takes the torch method's arguments (the registry row's
apply.takes), out_dtype and, for DARE and DELLA, the keep bits their L1 pass drew, and returns what
the kernel does: (chunk, non-finite counts or None), or None where it does not cover the parameters
or the tensors (then the torch method runs).
"""
from .. import kernels
from ..kernels.dare import expert_seed
from ._blocks import row_length
from .della_magprune import compiled_rates
from .interpolation import model_stock_t
from .ranking import Cut


def _div(weights: list[float], normalize: bool) -> float:
    return sum(weights) if normalize else 1.0      # the references' `tau /= sum(weights)`


def _lo(thr: list[list[Cut]]) -> dict:
    """TIES and localize_stitch Cuts thr_i = [kept] (or [], keep all) as band lower bounds."""
    return {"lo": [t[0].t if t else None for t in thr], "lo_pos": [t[0].pos if t else None for t in thr]}


def _band(thr: list[list[Cut]]) -> dict:
    """Breadcrumbs Cuts thr_i = [dropped, kept] (or [], keep all) as band bounds."""
    return {"hi": [t[0].t if t else None for t in thr], "hi_pos": [t[0].pos if t else None for t in thr],
            **_lo([t[1:] for t in thr])}


def _elects(xs) -> bool:
    return len(xs) <= kernels.MAX_ELECT_EXPERTS


def _random(xs, density, seed, key, offset, gain, kept) -> dict:
    """DARE's keep masks: seeds per expert, as methods.dare._kept, or the bits the L1 pass drew (`kept`)."""
    drawn = {"kept": kept} if kept is not None else {}          # the compiled loops' alone
    return {"trim": "random", "density": density, "gain": gain, "offset": offset, **drawn,
            "seeds": [expert_seed(seed, key, i) for i in range(len(xs))]}


def _magprune(b, xs, density, epsilon, rescale, seed, key, offset, shape, gain, kept) -> dict | None:
    """DELLA's drop with the keep rate of each element (della_magprune.keep_rates), or the bits the L1 pass
    drew (`kept`, then no rate is needed): the compiled C loops only."""
    if kept is not None and kernels.compiled_for(b, *xs):
        return _random(xs, [1.0] * len(xs), seed, key, offset, gain, kept)
    rates = compiled_rates(b, xs, density, epsilon, row_length(shape))
    if rates is None:
        return None
    return {**_random(xs, [1.0] * len(xs), seed, key, offset, gain, None), "rates": rates,
            "inverse": rescale == "inverse"}


def linear(b, xs, *, weights, normalize, out_dtype):
    return kernels.delta_merge(None, xs, weights=weights, scale=1.0, div=_div(weights, normalize), out_dtype=out_dtype)


def task_arithmetic(b, xs, *, weights, scale, normalize, out_dtype):
    return kernels.delta_merge(b, xs, weights=weights, scale=scale, div=_div(weights, normalize), out_dtype=out_dtype)


def ties(b, xs, *, weights, scale, consensus, aggregate, thr, out_dtype):
    return kernels.delta_merge(b, xs, weights=weights, scale=scale, trim="band", **_lo(thr), elect=consensus,
                               aggregate=aggregate, out_dtype=out_dtype) if _elects(xs) else None


def breadcrumbs(b, xs, *, weights, scale, normalize, thr, out_dtype):
    return kernels.delta_merge(b, xs, weights=weights, scale=scale, div=_div(weights, normalize), trim="band",
                               **_band(thr), out_dtype=out_dtype)


def breadcrumbs_ties(b, xs, *, weights, scale, consensus, aggregate, thr, out_dtype):
    return kernels.delta_merge(b, xs, weights=weights, scale=scale, trim="band", **_band(thr), elect=consensus,
                               aggregate=aggregate, out_dtype=out_dtype) if _elects(xs) else None


def dare_linear(b, xs, *, weights, scale, normalize, density, seed, key, offset, gain, out_dtype, kept=None):
    return kernels.delta_merge(b, xs, weights=weights, scale=scale, div=_div(weights, normalize),
                               **_random(xs, density, seed, key, offset, gain, kept), out_dtype=out_dtype)


def dare_ties(b, xs, *, weights, scale, consensus, aggregate, density, seed, key, offset, gain, out_dtype,
              kept=None):
    return kernels.delta_merge(b, xs, weights=weights, scale=scale,
                               **_random(xs, density, seed, key, offset, gain, kept), elect=consensus,
                               aggregate=aggregate, out_dtype=out_dtype) if _elects(xs) else None


def localize_stitch(b, xs, *, thr, out_dtype):
    return kernels.masked_stitch(b, xs, **_lo(thr), out_dtype=out_dtype)


def consensus(b, xs, *, weights, scale, k, tall_lambda, mtl, consensus, aggregate, thr, out_dtype):
    """TALL masks over task arithmetic only; mtl='ties' runs the torch method."""
    if mtl != "ta":
        return None
    return kernels.tall_merge(b, xs, weights=weights, tall_lambda=tall_lambda, k=k, scale=scale, out_dtype=out_dtype)


def della_linear(b, xs, *, weights, scale, normalize, density, epsilon, rescale, seed, key, offset, shape, gain,
                 out_dtype, kept=None):
    drop = _magprune(b, xs, density, epsilon, rescale, seed, key, offset, shape, gain, kept)
    return kernels.delta_merge(b, xs, weights=weights, scale=scale, div=_div(weights, normalize), **drop,
                               out_dtype=out_dtype) if drop else None


def della(b, xs, *, weights, scale, consensus, aggregate, density, epsilon, rescale, seed, key, offset, shape, gain,
          out_dtype, kept=None):
    drop = _magprune(b, xs, density, epsilon, rescale, seed, key, offset, shape, gain, kept) if _elects(xs) else None
    return kernels.delta_merge(b, xs, weights=weights, scale=scale, **drop, elect=consensus, aggregate=aggregate,
                               out_dtype=out_dtype) if drop else None


def model_stock(b, xs, *, filter_wise, cos, shape, out_dtype):
    """The compiled C loops only (t per row, or one for the tensor)."""
    if not kernels.compiled_for(b, *xs):
        return None
    t = model_stock_t(b, xs, filter_wise=filter_wise, cos=cos, shape=shape)
    return kernels.mix(b, xs, t=t, u=1 - t, row=row_length(shape) if filter_wise else xs[0].numel(),
                       out_dtype=out_dtype)


def slerp(b, xs, *, coef, out_dtype):
    """c_b b + c_x x: linear's weighted sum of [b, x]; the base's and the expert's counts are its experts'."""
    done = kernels.delta_merge(None, [b, xs[0]], weights=list(coef), scale=1.0, out_dtype=out_dtype)
    if done is None or done[1] is None:
        return done
    out, bad = done
    return out, [bad[0], *bad[2:]]
