"""Fisher and Gram collectors (stats/fisher.py, stats/gram.py) against brute-force references
written here: plain autograd per unpadded example, and activations captured by the test's own
hooks (checked once more against the layer maths). A tiny random Llama, float32, on the CPU."""
import pytest
import torch

from mbmerge.common.errors import BadParameter
from mbmerge.stats.fisher import fisher
from mbmerge.stats.gram import gram
from mbmerge.stats.groups import plan_groups

V, PAD = 40, 0


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=V, max_position_embeddings=32,
                      tie_word_embeddings=False, attn_implementation="eager")
    return LlamaForCausalLM(cfg).float().eval()


# (input_ids, prompt length): the labels are the ids after the prompt.
EXAMPLES = [([1, 5, 9, 3, 7, 2], 2), ([1, 11, 4, 8, 30, 21, 17, 2], 3), ([1, 6, 2], 1), ([1, 33, 12, 19, 2], 4)]


def pad(examples, T=None):
    """Right-padded batch: labels -100 on the prompt and padding."""
    T = T or max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), T), PAD)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    labels = torch.full((len(examples), T), -100)
    for r, (x, p) in enumerate(examples):
        ids[r, :len(x)], mask[r, :len(x)] = torch.tensor(x), 1
        labels[r, p:len(x)] = torch.tensor(x[p:])
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def one_by_one_padded():
    """Batches of one example, each padded to 10 tokens (padding must not matter)."""
    return lambda: iter([pad([ex], T=10) for ex in EXAMPLES])


def collect(fn, *args, **kw):
    out = {}
    info = fn(*args, emit=lambda n, t: out.__setitem__(n, t), **kw)
    return out, info


def brute_fisher(model, labels, seed=0):
    """(1/N) sum_examples (d/dtheta sum_t log p(y_t | x_<t))**2, one unpadded example at a time.
    Sampled y: u ~ torch.rand(n_targets) from Generator(seed), y = #{i : cumsum(p)_i <= u * sum(p)}."""
    params = dict(model.named_parameters())
    F = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    gen = torch.Generator().manual_seed(seed)
    for x, p in EXAMPLES:
        logp = torch.log_softmax(model(torch.tensor([x])).logits[0].double(), dim=-1)   # [T, V]
        rows = logp[p - 1:len(x) - 1]                   # the rows predicting tokens p .. T-1
        if labels == "empirical":
            y = torch.tensor(x[p:])
        else:
            u = torch.rand(len(rows), generator=gen).double()
            c = torch.cumsum(rows.detach().float().exp().double(), dim=-1)
            y = (c <= (u * c[:, -1])[:, None]).sum(dim=-1)
        ll = rows[torch.arange(len(rows)), y].sum()
        for (n, _), g in zip(params.items(), torch.autograd.grad(ll, list(params.values()))):
            F[n] += g.double() ** 2
    return {n: f / len(EXAMPLES) for n, f in F.items()}


def assert_close(got: dict, want: dict, rtol=1e-4, atol=1e-9):
    """float32 results against float64 references; atol is relative to each tensor's largest entry
    (entries near zero come from cancellation and carry float32 rounding of the big ones)."""
    assert got.keys() == want.keys()
    for n in want:
        assert got[n].dtype == torch.float32 and got[n].device.type == "cpu", n
        assert got[n].shape == want[n].shape, n
        torch.testing.assert_close(got[n].double(), want[n].double(), rtol=rtol,
                                   atol=atol * float(want[n].abs().max()), msg=lambda m: f"{n}: {m}")


def test_plan_groups():
    assert plan_groups([("a", 3), ("b", 3), ("c", 9), ("d", 1), ("e", 6)], 6) == [["a", "b"], ["c"], ["d"], ["e"]]
    assert plan_groups([("a", 3), ("b", 3)], 1 << 30) == [["a", "b"]]
    assert plan_groups([], 10) == []


@pytest.mark.parametrize("labels", ["empirical", "sampled"])
def test_fisher_equals_brute_force(model, labels):
    got, info = collect(fisher, model, one_by_one_padded(), labels=labels, seed=3)
    assert_close(got, brute_fisher(model, labels, seed=3))
    targets = sum(len(x) - p for x, p in EXAMPLES)
    assert info["examples"] == 4 and info["tokens"] == targets and info["passes"] == 1


def test_sampled_fisher_is_seeded_and_differs_from_empirical(model):
    a, _ = collect(fisher, model, one_by_one_padded(), labels="sampled", seed=1)
    b, _ = collect(fisher, model, one_by_one_padded(), labels="sampled", seed=1)
    c, _ = collect(fisher, model, one_by_one_padded(), labels="sampled", seed=2)
    e, _ = collect(fisher, model, one_by_one_padded(), labels="empirical")
    n = "model.layers.1.mlp.down_proj.weight"
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.allclose(a[n], c[n]) and not torch.allclose(a[n], e[n])


def test_fisher_groups_match_one_pass_and_leave_the_model_alone(model):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.model.embed_tokens.weight.requires_grad_(False)        # a caller's frozen parameter
    model.train()
    try:
        names = [n for n, _ in model.named_parameters()][3:12]
        one, info1 = collect(fisher, model, one_by_one_padded(), names=names, labels="sampled")
        many, info = collect(fisher, model, one_by_one_padded(), names=names, labels="sampled", budget=2048)
        assert info1["passes"] == 1 and info["passes"] > 1
        assert list(many) == names
        assert_close(many, one, rtol=1e-6)
        assert model.training and not model.model.embed_tokens.weight.requires_grad
        assert all(p.requires_grad and p.grad is None
                   for n, p in model.named_parameters() if n != "model.embed_tokens.weight")
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    finally:
        model.model.embed_tokens.weight.requires_grad_(True)
        model.eval()


def test_fisher_rejects_bad_arguments(model):
    with pytest.raises(BadParameter, match="labels"):
        fisher(model, one_by_one_padded(), labels="hard", emit=print)
    with pytest.raises(BadParameter, match="no_such"):
        fisher(model, one_by_one_padded(), names=["no_such.weight"], emit=print)


def brute_gram(model):
    """X^T X / n per Linear (but lm_head) from inputs captured by the test's own pre-hooks on the
    unpadded examples run one by one."""
    linears = {f"{m}.weight": mod for m, mod in model.named_modules()
               if isinstance(mod, torch.nn.Linear) and m != "lm_head"}
    xs = {n: [] for n in linears}
    hooks = [mod.register_forward_pre_hook(lambda _, a, n=n: xs[n].append(a[0][0].detach().double()))
             for n, mod in linears.items()]
    with torch.no_grad():
        for x, _ in EXAMPLES:
            model(torch.tensor([x]))
    for h in hooks:
        h.remove()
    X = {n: torch.cat(v) for n, v in xs.items()}                    # [tokens, in]
    # The capture itself, checked against the layer maths: q_proj's input is the normed embedding.
    ids = torch.tensor([t for x, _ in EXAMPLES for t in x])
    layer0 = model.model.layers[0]
    with torch.no_grad():
        torch.testing.assert_close(X["model.layers.0.self_attn.q_proj.weight"],
                                   layer0.input_layernorm(model.model.embed_tokens(ids)).double())
    return {n: x.T @ x / len(x) for n, x in X.items()}


def test_gram_equals_explicit_capture_without_padding(model):
    padded = lambda: iter([pad(EXAMPLES[:2]), pad(EXAMPLES[2:], T=12)])     # padding in both batches
    got, info = collect(gram, model, padded)
    want = brute_gram(model)
    assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got["model.layers.0.mlp.down_proj.weight"].shape == (32, 32)
    assert info["examples"] == 4 and info["tokens"] == sum(len(x) for x, _ in EXAMPLES)
    assert info["passes"] == 1


def test_gram_groups_and_names(model):
    padded = lambda: iter([pad(EXAMPLES[:3]), pad(EXAMPLES[3:])])
    one, _ = collect(gram, model, padded)
    many, info = collect(gram, model, padded, budget=16 * 16 * 4)
    assert info["passes"] == len(one) and list(many) == list(one)
    assert all(torch.equal(many[n], one[n]) for n in one)
    some, _ = collect(gram, model, padded, names=["lm_head.weight", "model.layers.1.self_attn.o_proj.weight"])
    assert list(some) == ["model.layers.1.self_attn.o_proj.weight", "lm_head.weight"]
    assert torch.equal(some["model.layers.1.self_attn.o_proj.weight"], one["model.layers.1.self_attn.o_proj.weight"])
    with pytest.raises(BadParameter, match="no_such"):
        gram(model, padded, names=["no_such.weight"], emit=print)


def test_data_that_changes_between_passes_is_an_error(model):
    calls = []
    def batches():
        calls.append(1)
        return iter([pad(EXAMPLES[:len(calls)])])
    with pytest.raises(BadParameter, match="changed between passes"):
        gram(model, batches, budget=1, emit=lambda n, t: None)
