"""NAN (Si et al. 2025, arXiv:2505.16148): per-expert weights from the inverse of each expert's norm

Merging coefficients for any method that takes per-expert weights. A least-squares view of merging weights each model by how much task information it holds, and NAN
estimates that by the inverse norm of its parameters (`--weights-from nan`):

    theta_i = expert i's parameters (every tensor the merge merges), N_i = ||theta_i||_2
    w_i = (1 / N_i) / sum_j (1 / N_j)                 the coefficients sum to 1
    then the method as usual with these w_i, e.g. task arithmetic: b + lam * sum_i w_i d_i

N_i comes from a pre-pass over the inputs before the merge (engine/norms.py: float64 squares summed
per 4096-element granule and the granules exactly, with math.fsum, so the coefficients do not depend
on the chunking); the card records N_i and w_i. Imports no torch.
"""
WEIGHTS_FROM = ("nan",)


def nan_weights(norms: list[float]) -> list[float]:
    """w_i = (1 / N_i) / sum_j (1 / N_j) for the experts' parameter norms N_i (all > 0)."""
    inverse = [1 / n for n in norms]
    return [v / sum(inverse) for v in inverse]
