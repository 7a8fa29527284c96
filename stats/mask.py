"""Trained Localize-and-Stitch mask for one expert (He et al. 2024, arXiv:2408.13656).

    d      = x - b                          over the masked parameters `names`
    S_0    = +sigma_b on the k largest |d| model-wide, else -sigma_b,  k = max(1, floor(sparsity n)),
             exactly k: ties broken by parameter order, then position (the dataless localize_stitch mask)
    per epoch, theta = b + sigmoid(S) d held fixed:
      g    = d L / d theta,  L = the mean causal-LM loss over every target token of the epoch
      S   <- S - lr g d sigmoid'(S) - l1 sigmoid'(S)      (sigmoid' = s (1 - s))
    m      = [S > 0]  = round(sigmoid(S))

One update per epoch on the averaged gradient, with the model never stepped, as the original
L&S repo (yifei-he/Localize-and-Stitch, train_graft). Differences from it: the mean is over
target tokens (batch losses weighted by their token counts, so the mask does not depend on the
batching) rather than a mean of per-batch means; the init keeps exactly k (its top-k init keeps
|d| > t); the L1 term is the gradient of l1 sum sigmoid(S), its commented-out line (the live
one adds l1 sign(S) sigmoid'(S), which pushes kept entries further up). MergeBench instead runs
an SFTTrainer epoch that also takes AdamW steps on the model and sums the raw gradients over
steps (so its lr 1e8 acts on a sum; ours on a mean).

Memory: S lives on the host (float32); d is recomputed from base/expert at each use rather
than stored; gradients are folded into float32 accumulators on the parameters' devices as each
one is ready. No optimizer.
"""
import time
from dataclasses import dataclass, fields
from math import floor
from typing import Callable

import torch

from ..methods.ranking import Rank, Ranking, bounds, tie_counts
from ..common.errors import BadParameter
from .fisher import log_likelihood
from .groups import device_of, measuring, on_device


@dataclass(frozen=True, kw_only=True)
class MaskTraining:
    """The trained mask's hyper-parameters (localize_stitch_trained's collection parameters): the
    share kept at the start (sparsity), the logits' starting magnitude sigma_b (sigmoid_bias), the
    step size, the epochs and the L1 weight of the equations above."""
    sparsity: float = 0.1
    sigmoid_bias: float = 3.0
    lr: float = 1e8
    epochs: int = 1
    l1: float = 0.0


MASK_TRAINING = tuple(f.name for f in fields(MaskTraining))


def train_mask(model, base: Callable[[str], torch.Tensor], expert: Callable[[str], torch.Tensor], batches,
               *, names: list[str], training: MaskTraining = MaskTraining(),
               emit: Callable[[str, torch.Tensor], None]) -> dict:
    """Train the mask of one expert on its data; emit(name, uint8 CPU mask of the param's shape).

    model: loaded from the base; its `names` parameters are overwritten while training and hold
    the base again on return. batches(): a fresh iterator of {input_ids, attention_mask, labels}.
    Returns {"examples", "tokens" (target tokens), "seconds", "kept", "init_kept", "loss_init",
    "loss_final"}; the losses are the mean task loss at the dataless and at the trained binary mask.
    """
    start = time.perf_counter()
    t = training
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing or not names:
        raise BadParameter(f"train_mask: no parameter {missing[0]!r} in the model" if missing
                           else "train_mask: no parameters to mask")

    def delta(n):
        d = expert(n).float() - base(n).float()
        if d.shape != params[n].shape:
            raise BadParameter(f"train_mask: {n} has shape {tuple(d.shape)}, the model's is {tuple(params[n].shape)}")
        return d

    numel = sum(params[n].numel() for n in names)
    # localize_stitch's dataless mask: exactly the top k |d| of the model, ties in the order of `names`
    k = min(numel, max(1, floor(t.sparsity * numel)))
    ranking = Ranking(bounds([[Rank(k)]], lambda: ((None, [delta(n).flatten()]) for n in names), numel,
                             keep_ties=False))

    def init(n):
        a = delta(n).abs()
        cut = ranking.cuts(a.numel(), *tie_counts(lambda i: a.flatten()))[0][0]
        return torch.where(cut.mask(a.flatten()).view(a.shape), t.sigmoid_bias, -t.sigmoid_bias).float()
    S = {n: init(n) for n in names}
    init_kept = sum(int((s > 0).sum()) for s in S.values()) / numel

    with measuring(model):        # eval mode, flags restored; only _gradients unfreezes
        try:
            _load(params, names, base, delta, lambda n: (S[n] > 0).float())
            loss_init, examples, tokens = _mean_loss(model, batches)
            for _ in range(t.epochs):
                _load(params, names, base, delta, lambda n: torch.sigmoid(S[n]))
                acc, count = _gradients(model, params, names, batches)
                for n in names:      # g = acc / count: the mean over this epoch's target tokens
                    s = torch.sigmoid(S[n])
                    S[n] -= (t.lr * acc.pop(n).cpu().div_(count) * delta(n) + t.l1) * s * (1 - s)
            _load(params, names, base, delta, lambda n: (S[n] > 0).float())
            loss_final = _mean_loss(model, batches)[0]
        finally:
            with torch.no_grad():
                for n in names:
                    params[n].copy_(base(n))
    for n in names:
        emit(n, (S[n] > 0).to(torch.uint8))
    return {"examples": examples, "tokens": tokens, "seconds": time.perf_counter() - start,
            "kept": sum(int((s > 0).sum()) for s in S.values()) / numel, "init_kept": init_kept,
            "loss_init": loss_init, "loss_final": loss_final}


@torch.no_grad()
def _load(params, names, base, delta, coef):
    """theta = b + coef(n) d for every masked parameter, in the parameter's dtype and device."""
    for n in names:
        params[n].copy_(base(n).float() + coef(n) * delta(n))


def _batch_loss(model, batch):
    """(summed cross-entropy over the batch's target tokens, their count): HF's shifted labels."""
    ll, n = log_likelihood(model, batch, "empirical", None)
    return -ll, n


def _mean_loss(model, batches):
    """(mean loss per target token, examples, target tokens) over one pass of the data, no grad."""
    total, examples, tokens = 0.0, 0, 0
    with torch.no_grad():
        for batch in on_device(batches, device_of(model)):
            loss, n = _batch_loss(model, batch)
            total, examples, tokens = total + float(loss), examples + len(batch["input_ids"]), tokens + n
    if not tokens:
        raise BadParameter("train_mask: the data has no target tokens (every label is -100)")
    return total / tokens, examples, tokens


def _gradients(model, params, names, batches) -> tuple[dict, int]:
    """(sum over the data of d(summed loss)/d theta, float32 on each parameter's device; target
    tokens). Only the masked parameters require grad; each grad is folded in and freed when ready."""
    acc, count = {}, 0

    def fold(n):
        def hook(p):
            g = p.grad.float()
            acc[n] = acc[n].add_(g) if n in acc else g
            p.grad = None
        return hook

    handles = [params[n].requires_grad_(True).register_post_accumulate_grad_hook(fold(n)) for n in names]
    try:
        for batch in on_device(batches, device_of(model)):
            with torch.enable_grad():
                loss, n = _batch_loss(model, batch)
            loss.backward()
            count += n
    finally:
        for h in handles:
            h.remove()
        for n in names:
            params[n].requires_grad_(False)
    # a parameter the loss does not reach has a zero gradient
    return {n: acc.get(n, torch.zeros_like(params[n], dtype=torch.float32)) for n in names}, count
