"""The fused paths of the mask methods and of model_stock's and slerp's interpolations (the task-arithmetic
family's is task_vectors.fused): one adapter per method maps its parameters and statistics to one kernels.*
call (Triton on the GPU, compiled C on the CPU) that reads each input once, in its stored dtype, and writes
the merged chunk once, in out_dtype. The torch methods stay the references; `dispatch.merge_chunk` calls an
adapter when `kernels.fused(device)`; an adapter takes what the torch method takes and out_dtype, and returns
what the kernel does: (chunk, non-finite counts or None), or None where it does not cover the parameters or
the tensors (then the torch method runs).
"""
from .. import kernels
from ._blocks import cut_bounds, row_length
from .interpolation import model_stock_t
from .ranking import Cut


def localize_stitch(b, xs, *, thr: list[list[Cut]], out_dtype):
    return kernels.masked_stitch(b, xs, **cut_bounds([t[0] if t else None for t in thr], "lo"), out_dtype=out_dtype)


def consensus(b, xs, *, weights, scale, k, tall_lambda, mtl, out_dtype):
    """TALL masks over task arithmetic only; mtl='ties' runs the torch method."""
    if mtl != "ta":
        return None
    return kernels.tall_merge(b, xs, weights=weights, tall_lambda=tall_lambda, k=k, scale=scale, out_dtype=out_dtype)


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
