"""stats/mask.py: the trained Localize-and-Stitch mask on the micro zoo, checked against plain-torch
references written here (top-k by sort, the loss by HF's own .loss on a model we build)."""
from math import floor

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mbmerge.eval.zoo import batch_of, finetune_data
from mbmerge.stats.mask import MaskTraining, train_mask
from conftest import top_mask

SEQS = finetune_data(["math"], 32)


@pytest.fixture(scope="module")
def zoo(micro_zoo):
    b = load_file(str(micro_zoo / "base" / "model.safetensors"))
    x = load_file(str(micro_zoo / "math" / "model.safetensors"))
    names = [n for n, v in b.items() if v.is_floating_point() and "embed_tokens" not in n and "lm_head" not in n]
    return micro_zoo, b, x, names


def model_of(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def batches(bs):
    return lambda: (batch_of(SEQS, list(range(i, min(i + bs, len(SEQS))))) for i in range(0, len(SEQS), bs))


def run(zoo, bs=8, **kw):
    folder, b, x, names = zoo
    model, masks = model_of(folder / "base"), {}
    info = train_mask(model, b.__getitem__, x.__getitem__, batches(bs), names=names,
                      training=MaskTraining(**kw), emit=masks.__setitem__)
    return model, masks, info


def topk_masks(b, x, names, sparsity=0.1):
    d = {n: x[n].float() - b[n].float() for n in names}
    flat = torch.cat([v.abs().flatten() for v in d.values()])
    k = max(1, floor(sparsity * flat.numel()))          # exactly k: ties broken in the order of `names`
    kept = top_mask(flat, k).split([v.numel() for v in d.values()])
    return {n: m.view(v.shape).to(torch.uint8) for (n, v), m in zip(d.items(), kept)}


def task_loss(folder, b, x, masks):
    """Mean loss per target token of b + m d, loaded into a fresh model, from HF's .loss."""
    model = model_of(folder / "base").eval()
    with torch.no_grad():
        for n, m in masks.items():
            model.get_parameter(n).copy_(b[n] + m.float() * (x[n] - b[n]))
        total = count = 0
        for bt in batches(5)():
            k = int((bt["labels"][:, 1:] != -100).sum())
            total, count = total + float(model(**bt).loss) * k, count + k
    return total / count


def assert_base(model, b):
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), b[n]), n


def test_lr0_is_the_dataless_topk_mask(zoo):
    folder, b, x, names = zoo
    model, masks, info = run(zoo, lr=0.0)
    ref = topk_masks(b, x, names)
    assert list(masks) == names
    for n in names:
        assert masks[n].dtype == torch.uint8 and masks[n].device.type == "cpu"
        assert torch.equal(masks[n], ref[n]), n
    total = sum(m.numel() for m in ref.values())
    kept = sum(int(m.sum()) for m in ref.values()) / total
    assert info["kept"] == info["init_kept"] == pytest.approx(kept)
    assert info["examples"] == len(SEQS) and info["tokens"] == sum(sum(y != -100 for y in ys[1:]) for _, ys in SEQS)
    assert info["loss_init"] == pytest.approx(task_loss(folder, b, x, ref), rel=1e-5)
    assert info["loss_final"] == pytest.approx(info["loss_init"], rel=1e-6)
    assert_base(model, b)


def test_trained_mask_lowers_the_task_loss(zoo):
    folder, b, x, names = zoo
    # the micro zoo v2's experts sit far from the base: a step of 1e6 overshoots (loss 1.46 -> 2.02), 3e4 does not
    model, masks, info = run(zoo, lr=3e4, epochs=2)
    dataless, trained = task_loss(folder, b, x, topk_masks(b, x, names)), task_loss(folder, b, x, masks)
    assert trained < dataless - 0.1
    assert info["loss_final"] == pytest.approx(trained, rel=1e-5)
    assert info["loss_init"] == pytest.approx(dataless, rel=1e-5)
    ones, total = sum(int(m.sum()) for m in masks.values()), sum(m.numel() for m in masks.values())
    assert info["kept"] == pytest.approx(ones / total)
    assert_base(model, b)
    assert all(p.requires_grad for p in model.parameters()) and model.training is False  # as loaded


def test_batching_does_not_change_the_mask(zoo):
    _, a, ia = run(zoo, bs=4, lr=1e6)
    _, c, ic = run(zoo, bs=8, lr=1e6)
    assert ia["kept"] != ia["init_kept"]         # the update moved something
    assert all(torch.equal(a[n], c[n]) for n in a)
    assert ia["loss_final"] == pytest.approx(ic["loss_final"], rel=1e-5)


def test_l1_pulls_masks_toward_zero(zoo):
    # lr=0: S = +-3 moves by -l1 sigmoid'(3) = -l1 * 0.0452; l1=100 drops every kept entry, l1=1 none
    assert run(zoo, lr=0.0, l1=100.0)[2]["kept"] == 0
    assert run(zoo, lr=0.0, l1=1.0)[2]["kept"] == pytest.approx(0.1, abs=1e-3)
