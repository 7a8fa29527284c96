"""DELLA (Deep et al. 2024, arXiv:2406.11617): MagPrune, a DARE drop whose keep probability grows
with the entry's magnitude rank in its row; then add (della_linear) or TIES-merge (della).

    r_i(j) = rank of |d_i(j)| in its row of m, ascending, ties by position, / (m - 1)   (m = 1: r = 1/2)
    p_i(j) = (rho_i - eps_i) + 2 eps_i r_i(j)          keep probability, mean rho_i over a row
    keep_i = [u_i(j) < p_i(j)]    u from DARE's Philox keyed by (seed, tensor name, expert i), j = element index
    e_i    = g_i * keep_i * d_i   g_i = 1/p_i(j) per element ('inverse', paper),
                                  ||d_i||_1 / ||keep_i d_i||_1 per tensor ('l1', mergekit; 1 if a norm < 1e-7), or 1 ('none')
    della_linear: b + lam * sum_i w_i e_i          (normalize: / sum_i w_i)
    della:        TIES sign election and disjoint merge of w_i e_i, then b + lam * m

A row is the last dimension; a 1-D tensor is one row. Needs eps_i >= 0, rho_i - eps_i > 0 and
rho_i + eps_i <= 1 (mergekit: < 1); rho_i = 1 keeps everything, as in mergekit. The sum and the
election are the family's (task_vectors.py).
vs mergekit 0.1.5: its masks are torch.bernoulli draws (so no bitwise parity), it breaks rank ties
in argsort order, fails on rows of one element (0/0 ranks), and always rescales by 'l1'.
"""
import torch

from .. import kernels
from ..common.errors import BadParameter
from ..kernels.dare import expert_seed
from ._blocks import KeepBits, float_deltas, granule_sums, l1_gains, row_length
from .dare_drop import fused_trim as fused_drop


def _check(density: list[float], epsilon: list[float]) -> None:
    for rho, eps in zip(density, epsilon):
        if rho < 1 and not (eps >= 0 and rho - eps > 0 and rho + eps <= 1):
            raise BadParameter(f"della: density={rho}, epsilon={eps} give keep probabilities outside (0, 1]; "
                               f"need 0 <= epsilon < density <= 1 - epsilon (or density=1)")


def _rank01(a: torch.Tensor, m: int) -> torch.Tensor:
    """r(j): ascending rank of a(j) in its row of m (ties by position) / (m - 1); 1/2 if m = 1."""
    if m == 1:
        return torch.full_like(a, 0.5)
    order = a.view(-1, m).argsort(dim=1, stable=True)                        # [rows, m]
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(m, device=a.device).expand_as(order))
    return rank.view(-1).to(torch.float32).div_(m - 1)


def keep_rates(d: torch.Tensor, rho: float, eps: float, m: int, b: torch.Tensor | None = None) -> torch.Tensor:
    """p(j) of d (or of d = x - b, given b and x as d), compiled where the kernels run."""
    p = kernels.keep_rates(b, d, m, rho - eps, 2 * eps)
    if p is None:
        a = (d.float() - b.float()).abs_() if b is not None else d.abs()
        p = _rank01(a, m).mul_(2 * eps).add_(rho - eps)
    return p


def compiled_rates(b, xs, density: list[float], epsilon: list[float], m: int) -> list | None:
    """Each expert's p(j) on a chunk's stored inputs by the compiled C loops (None where rho = 1: kept
    whole), or None off them."""
    if not kernels.compiled_for(b, *xs):
        return None
    return [kernels.keep_rates(b, x, m, rho - eps, 2 * eps) if rho < 1 else None
            for x, rho, eps in zip(xs, density, epsilon)]


def _kept(d: torch.Tensor, i: int, rho: float, eps: float, m: int, seed: int, key: str, offset: int,
          inverse: bool) -> torch.Tensor:
    """keep_i * d_i, divided by p_i(j) if inverse; d holds whole rows."""
    if rho >= 1:
        return d
    p = keep_rates(d, rho, eps, m)
    u = kernels.uniform(expert_seed(seed, key, i), offset, d.numel(), d.device)
    e = (p - u).sign_().relu_().mul_(d)                                      # [u < p] * d, as float arithmetic
    return e.div_(p) if inverse else e


def rescale_gains(chunks, *, density: list[float], epsilon: list[float], rescale: str, seed: int, key: str,
          shape: tuple) -> dict:
    """Checks rho and eps; g_i for 'l1' (a pass over the tensor, summed per row), else 1."""
    _check(density, epsilon)
    if rescale != "l1":
        return {"gain": [1.0] * len(density)}
    m = row_length(shape)
    seeds = [expert_seed(seed, key, i) for i in range(len(density))]
    kept = KeepBits(shape=shape, experts=len(density), granule=m)

    def sums(b, xs, offset):
        # the compiled loops rank each row in the pass, for its keep rates
        compiled = kernels.l1_sums(b, xs, offset=offset, seeds=seeds, granule=m, density=density,
                                   ranks=[(rho - eps, 2 * eps) for rho, eps in zip(density, epsilon)],
                                   kept=kept.new(b, xs, offset))
        if compiled is not None:
            return compiled
        ds = float_deltas(b, xs)
        return [[granule_sums(d.abs(), m) for d in ds],
                [granule_sums(_kept(d, i, rho, eps, m, seed, key, offset, False).abs(), m)
                 for i, (d, rho, eps) in enumerate(zip(ds, density, epsilon))]]
    return {"gain": l1_gains(chunks, sums, len(density)), "kept": kept.chunks}


def trim(ds: list[torch.Tensor], *, density: list[float], epsilon: list[float], rescale: str, seed: int, key: str,
         offset: int, shape: tuple, gain: list[float]) -> list[torch.Tensor]:
    """e_i before w_i: g_i * keep_i * d_i, divided by p_i(j) for 'inverse'; ds hold whole rows."""
    m = row_length(shape)
    return [_kept(d, i, rho, eps, m, seed, key, offset, rescale == "inverse").mul_(g)
            for i, (d, rho, eps, g) in enumerate(zip(ds, density, epsilon, gain))]


def fused_trim(b, xs, *, density: list[float], epsilon: list[float], rescale: str, seed: int, key: str, offset: int,
               shape: tuple, gain: list[float], kept: torch.Tensor | None = None) -> dict | None:
    """trim as kernels.delta_merge's random drop at each element's keep rate (compiled_rates), or with the
    bits the L1 pass drew (`kept`; then no rate is needed): the compiled C loops only."""
    if kept is not None and kernels.compiled_for(b, *xs):
        return fused_drop(b, xs, density=[1.0] * len(xs), seed=seed, key=key, offset=offset, gain=gain, kept=kept)
    rates = compiled_rates(b, xs, density, epsilon, row_length(shape))
    if rates is None:
        return None
    return {**fused_drop(b, xs, density=[1.0] * len(xs), seed=seed, key=key, offset=offset, gain=gain),
            "rates": rates, "inverse": rescale == "inverse"}
