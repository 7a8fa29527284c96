"""A MoE's router rows, as mergekit-moe 0.1.5 defines them: one unit vector per expert and layer, g[l, e] of [H].

    cheap_embed   v(P)    = sum of the token embeddings of prompts P (every token but padding) / its norm,
                            the same at every layer
    hidden        v_l(P)  = mean over prompts P of the hidden state of each prompt's last token at layer l's
                            input (hidden_states[l] of transformers: the embeddings' output for l = 0)
    hidden_avg    v_l(P)  = the same, each prompt's hidden states averaged over its padded length first
    g[l, e]               = v_l(positive_e) - v_l(negative_e) (without negatives: v_l(positive_e)), / its norm
    random        g ~ N(0, 1);  uniform_random: g ~ U(-1/sqrt(H), 1/sqrt(H)), torch.nn.Linear's initialisation;
                  both drawn from a generator seeded by `seed` (mergekit draws unseeded)

Prompts are tokenized as mergekit does: the BOS token's text before each, no other special tokens, padded on
the left with the BOS token (else EOS), all of one expert's prompts in one batch. The hidden states come from
the base one decoder layer at a time (stats/skeleton.py), so memory is one layer and the prompts' activations,
not the model; in bfloat16, as mergekit runs the base (3.4x faster than float32 on this CPU, and the routers
match mergekit's).
"""
import math
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from ..common.errors import BadParameter
from ..common.roles import EMBEDDINGS
from ..engine.inputs.quantized import open_model
from ..engine.inputs.side_files import load_tokenizer
from .skeleton import Skeleton, layer_tensors

def gate_vectors(mode: str, base: Path, groups: list[tuple[tuple[str, ...], tuple[str, ...]]], *, seed: int = 0,
                 device: str = "cpu", progress: bool = True) -> torch.Tensor:
    """g [layers, experts, hidden] in float32, one expert per (positive prompts, negative prompts) group."""
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(base)
    text = getattr(config, "text_config", None) or config
    layers, hidden = text.num_hidden_layers, text.hidden_size
    if mode in ("random", "uniform_random"):
        g = torch.Generator().manual_seed(seed)
        if mode == "random":
            return torch.randn(layers, len(groups), hidden, generator=g)
        bound = math.sqrt(1.0 / hidden)
        return torch.rand(layers, len(groups), hidden, generator=g) * 2 * bound - bound
    tokenizer = _prompt_tokenizer(base)
    vector = _cheap_embedding(base) if mode == "cheap_embed" else _HiddenStates(base, config, mode, device, progress)
    batches = [[_tokenized(tokenizer, prompts) if prompts else None for prompts in group] for group in groups]
    per_group = vector(batches, layers)                       # per group: [layers, H] of positive, of negative
    rows = []
    for pos, neg in per_group:
        v = pos - neg if neg is not None else pos
        rows.append(v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8))
    return torch.stack(rows, dim=1)


def degenerate_layers(g: torch.Tensor) -> list[int]:
    """The layers whose router rows are too alike to route apart: a condition number above 5 (mergekit warns at
    the same bound)."""
    if g.shape[1] < 2:
        return []
    return [i for i in range(g.shape[0]) if torch.linalg.cond(g[i].double()).item() > 5.0]


def _prompt_tokenizer(base: Path):
    from ..common.quiet import quiet_transformers
    with quiet_transformers():
        tok = load_tokenizer(base, "base", "the routers are made from prompts, tokenized by the base's tokenizer")
    tok.padding_side = "left"
    if tok.bos_token_id is not None:
        tok.pad_token_id = tok.bos_token_id
    elif tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    else:
        raise BadParameter(f"base {base}: its tokenizer has neither a BOS nor an EOS token to pad prompts with")
    return tok


def _tokenized(tokenizer, prompts: tuple[str, ...]) -> dict:
    return tokenizer([(tokenizer.bos_token or "") + p for p in prompts], return_tensors="pt", padding=True,
                     add_special_tokens=False)


def _cheap_embedding(base: Path):
    """v(P) from the base's token embeddings alone, the same at every layer."""
    m = open_model(base, "base")
    name = next((n for n in EMBEDDINGS if n in m.index.tensors), None)
    if name is None:
        m.close()
        raise BadParameter(f"base {base}: no token embeddings ({', '.join(EMBEDDINGS[:2])}, ...) for cheap_embed")
    try:
        e = m.index.tensors[name]
        embed = m.chunk(e, 0, e.numel).view(e.shape).to(torch.float32, copy=True)   # outlives the mapping

        def one(batch: dict) -> torch.Tensor:
            h = embed[batch["input_ids"]] * batch["attention_mask"].unsqueeze(-1)
            v = h.sum(dim=1).sum(dim=0)
            return v / v.norm().clamp(min=1e-8)

        def vectors(batches, layers: int):
            return [tuple(None if b is None else one(b).expand(layers, -1) for b in pair) for pair in batches]
        return vectors
    finally:
        m.close()


class _HiddenStates:
    """v_l(P) for every layer and group, the base run one decoder layer at a time over all groups' prompts."""

    def __init__(self, base: Path, config, mode: str, device: str, progress: bool):
        self.base, self.config, self.average, self.progress = base, config, mode == "hidden_avg", progress
        self.device = torch.device(device)

    def __call__(self, batches, layers: int):
        slot = Skeleton(base=self.base, config=self.config, dtype=torch.bfloat16, device=self.device)
        flat = [b for pair in batches for b in pair if b is not None]
        runs = [(lambda b=b: iter([b])) for b in flat]
        states = [list(slot.inputs(run))[0] for run in runs]          # the embeddings' output: layer 0's input
        picked = [[] for _ in flat]
        m = open_model(self.base, "base")
        try:
            for layer in tqdm(range(layers), desc="mbmerge moe: routers", unit="layer", disable=not self.progress,
                              file=sys.stderr):
                for k, (b, h) in enumerate(zip(flat, states)):
                    picked[k].append(self._pick(h, b))
                if layer + 1 < layers:
                    slot.load(layer, layer_tensors(m, layer, torch.bfloat16))
                    states = [list(slot.outputs(run, lambda _, h=h: h))[0] for run, h in zip(runs, states)]
        finally:
            m.close()
        found = iter(torch.stack(p) for p in picked)
        return [tuple(None if b is None else next(found) for b in pair) for pair in batches]

    def _pick(self, h: torch.Tensor, batch: dict) -> torch.Tensor:
        """[H]: each prompt's last token (left padding puts it last), or its padded length's mean; then the mean
        over prompts."""
        h = h.float()
        per_prompt = h.mean(dim=1) if self.average else h[:, -1, :]
        return per_prompt.mean(dim=0)
