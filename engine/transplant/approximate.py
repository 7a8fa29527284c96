"""Rows for the donor's new tokens, from the tokens both vocabularies share: pure tensor functions, no files,
no tokenizers. Notation: P [n, d'] is the donor's rows of the n shared tokens (the dictionary), M [n, d] the
model's rows of the same tokens, t [d'] a new token's donor row. omp and common_interpolation find a few
shared tokens j and weights w_j with t ~ sum_j w_j P_j, and give the new token the row sum_j w_j M_j (which
moves between models of other widths d' and d). Targets come in batches [B, d']; P may be stored in any
float dtype and is widened to float32 BLOCK rows at a time, so it is never held in float32 whole; the maths
is float32 throughout.
"""
import torch

BLOCK = 4096    # dictionary rows widened at a time: [4096, d'] float32, and [B, 4096] scores


def omp(t: torch.Tensor, P: torch.Tensor, k: int, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthogonal matching pursuit: k greedy steps, each picking the row of P not yet picked that is most
    correlated with the residual (max_j |<r, P_j>|), the residual r = t minus t's projection on the rows
    picked so far. Then w = argmin ||t - w P_S|| over the picked rows S, from their QR (Q kept orthonormal by
    Gram-Schmidt applied twice, R upper triangular: P_S^T = Q R, so R w = Q^T t).

    Args: t [B, d'] targets; P [n, d'] the dictionary; k <= n rows to pick.
    Returns: (S [B, k] the rows picked, in order; w [B, k] their weights, float32).
    """
    t = t.float()
    B, d = t.shape
    S = torch.zeros(B, k, dtype=torch.long)
    Q = torch.zeros(B, k, d)                                   # [B, k, d'] orthonormal rows
    R = torch.zeros(B, k, k)                                   # [B, k, k] upper triangular
    r = t.clone()
    for s in range(k):
        S[:, s] = _most_correlated(r, P, S[:, :s])
        a = P[S[:, s]].float()                                 # [B, d'] the new atom
        u, proj = a, torch.zeros(B, s)
        for _ in range(2):                                     # twice is enough (Kahan, Parlett)
            c = torch.bmm(Q[:, :s], u.unsqueeze(-1)).squeeze(-1)          # [B, s]
            u = u - torch.bmm(c.unsqueeze(1), Q[:, :s]).squeeze(1)
            proj = proj + c
        norm = u.norm(dim=1).clamp_min(eps)
        R[:, :s, s], R[:, s, s] = proj, norm
        Q[:, s] = u / norm.unsqueeze(1)
        Qs = Q[:, :s + 1]                                      # [B, s+1, d']
        r = t - torch.bmm(torch.bmm(Qs, t.unsqueeze(-1)).transpose(1, 2), Qs).squeeze(1)
    w = torch.linalg.solve_triangular(R, torch.bmm(Q, t.unsqueeze(-1)), upper=True).squeeze(-1)
    return S, w


def _most_correlated(r: torch.Tensor, P: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
    """Per residual, the row of P with the largest |<r, P_j>| among those not `picked` ([B, s]); the first
    such row on a tie."""
    B = r.shape[0]
    best, arg = torch.full((B,), -1.0), torch.zeros(B, dtype=torch.long)
    for a in range(0, P.shape[0], BLOCK):
        c = (r @ P[a:a + BLOCK].float().T).abs_()              # [B, b]
        inside = (picked >= a) & (picked < a + c.shape[1])
        rows, cols = inside.nonzero(as_tuple=True)
        c[rows, picked[rows, cols] - a] = -1.0                 # |.| >= 0: a picked row never wins
        m, j = c.max(dim=1)
        better = m > best
        best, arg = torch.where(better, m, best), torch.where(better, j + a, arg)
    return arg


def nearest(t: torch.Tensor, P: torch.Tensor, k: int, cosine: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The k rows of P nearest each target, nearest first: (S [B, k], their distances [B, k]), Euclidean
    (torch.cdist) or cosine (1 - cos, norms clamped at 1e-6)."""
    t = t.float()
    dist, S = torch.empty(t.shape[0], 0), torch.empty(t.shape[0], 0, dtype=torch.long)
    for a in range(0, P.shape[0], BLOCK):
        p = P[a:a + BLOCK].float()
        if cosine:
            cos = t @ p.T / (t.norm(dim=1, keepdim=True) * p.norm(dim=1).unsqueeze(0)).clamp_min(1e-6)
            block = 1 - cos
        else:
            block = torch.cdist(t, p)
        dist = torch.cat([dist, block], dim=1)
        S = torch.cat([S, torch.arange(a, a + p.shape[0]).expand(t.shape[0], -1)], dim=1)
        dist, keep = dist.topk(min(k, dist.shape[1]), dim=1, largest=False)
        S = S.gather(1, keep)
    return S, dist


def interpolation_weights(t: torch.Tensor, Pk: torch.Tensor, dist: torch.Tensor, scheme: str,
                          cosine: bool = False) -> torch.Tensor:
    """Weights w [B, k] of each target's k neighbours Pk [B, k, d'] (distances dist [B, k]):
    - distance_proportional: w_j proportional to 1 / dist_j (dist clamped at 1e-6), or to cos_j = 1 - dist_j;
    - barycentric: argmin ||t - w Pk|| subject to sum_j w_j = 1 (the constrained least squares' KKT system);
    - least_squares: argmin ||t - w Pk||."""
    t, Pk = t.float(), Pk.float()
    if scheme == "distance_proportional":
        w = 1 - dist if cosine else 1 / dist.clamp_min(1e-6)
        return w / w.sum(dim=1, keepdim=True).clamp_min(1e-6)
    if scheme == "least_squares":
        return torch.linalg.lstsq(Pk.transpose(1, 2), t.unsqueeze(-1)).solution.squeeze(-1)
    B, k, _ = Pk.shape
    G = torch.bmm(Pk, Pk.transpose(1, 2))                      # [B, k, k]
    kkt = torch.zeros(B, k + 1, k + 1)                         # [[G, 1], [1^T, 0]] [w; lambda] = [Pk t; 1]
    kkt[:, :k, :k], kkt[:, :k, k], kkt[:, k, :k] = G, 1.0, 1.0
    rhs = torch.cat([torch.bmm(Pk, t.unsqueeze(-1)), torch.ones(B, 1, 1)], dim=1)
    return torch.linalg.lstsq(kkt, rhs).solution.squeeze(-1)[:, :k]


def combine(w: torch.Tensor, M: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """sum_j w_j M[S_j] per target: w [B, k], M [n, d] (any float dtype), S [B, k] -> [B, d] float32; one
    pick at a time, so [B, k, d] is never held."""
    out = torch.zeros(S.shape[0], M.shape[1])
    for j in range(S.shape[1]):
        out += w[:, j:j + 1].float() * M[S[:, j]].float()
    return out


def subword(M: torch.Tensor, pieces: list[list[int]], how: str, head: bool) -> torch.Tensor:
    """Each new token's row from the model's rows M of the pieces the model's tokenizer cuts its text into
    (no piece: a zero row): their mean or sum; weighted_mean, weights 1..n rising towards the last piece for
    an embedding and towards the first for a head (the piece the model read last, or would predict first);
    first_last, the last piece's row for an embedding, the first's for a head. [len(pieces), d] float32."""
    n = torch.tensor([len(p) for p in pieces])
    token = torch.repeat_interleave(torch.arange(len(pieces)), n)          # [pieces] the token of each piece
    pos = torch.arange(token.numel()) - torch.repeat_interleave(n.cumsum(0) - n, n)   # 0 .. n-1 in its token
    size = n[token].float()
    if how == "mean":
        w = 1 / size
    elif how == "sum":
        w = torch.ones_like(size)
    elif how == "weighted_mean":
        rank = size - pos if head else pos + 1.0
        w = rank / (size * (size + 1) / 2)
    else:   # first_last
        w = (pos == 0).float() if head else (pos == size - 1).float()
    ids = torch.tensor([i for p in pieces for i in p], dtype=torch.long)
    out = torch.zeros(len(pieces), M.shape[1])
    return out.index_add_(0, token, M[ids].float() * w.unsqueeze(1))
