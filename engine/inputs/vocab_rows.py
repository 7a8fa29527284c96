"""A model's embedding and head in the output vocabulary's row order, gathered chunk by chunk from its
mapped tensors (vocabulary.py says which row each token takes): the merge reads these tensors through
the same chunk/release calls as any other, so only the rows of the chunks in flight are resident.
Knows nothing of tokenizers or of merging.
"""
from dataclasses import replace

import torch

from ...common.roles import VOCABULARY
from .header import DTYPES, TensorEntry
from .index import TensorIndex
from .read import MappedModel
from .vocabulary import Vocabulary



def vocab_tensors(index: TensorIndex) -> list[str]:
    return [n for n in VOCABULARY if n in index.tensors and len(index.tensors[n].shape) == 2]


def reshaped(index: TensorIndex, rows: int) -> TensorIndex:
    """The index as the merge sees it: its vocabulary tensors `rows` long (bytes still those of the source)."""
    tensors = dict(index.tensors)
    for name in vocab_tensors(index):
        e = tensors[name]
        tensors[name] = replace(e, shape=(rows, *e.shape[1:]), nbytes=rows * e.shape[1] * DTYPES[e.dtype].itemsize)
    return replace(index, tensors=tensors)


class VocabularyModel:
    """A model (a MappedModel, or one with an adapter folded in) whose vocabulary tensors have the output's
    rows: its own row where it has the token, else the row the vocabulary makes (from the merge inputs,
    `attach`), past the tokens its mean row. Other tensors are the inner model's."""

    def __init__(self, inner: MappedModel, ref: str, vocab: Vocabulary):
        self.inner = inner
        self.sources = {n: inner.index.tensors[n] for n in vocab_tensors(inner.index)}   # the entries as read
        self.index = reshaped(inner.index, vocab.rows)
        self.ref, self.own, self.vocab, self.inputs = ref, vocab.own[ref], vocab, []
        self.means: dict[str, torch.Tensor] = {}
        self._tables: tuple = (None, None)

    def attach(self, inputs: list["VocabularyModel"]) -> None:
        """The merge inputs, in the vocabulary's `inputs` order, whose rows make the missing ones."""
        self.inputs = inputs

    def chunk(self, entry: TensorEntry, start: int, stop: int) -> torch.Tensor:
        if entry.name not in self.sources or stop <= start:
            return self.inner.chunk(entry, start, stop)
        width = entry.shape[1]
        first, end = start // width, -(-stop // width)
        rows = self._rows(entry.name, first, end)
        return rows.view(-1)[start - first * width: stop - first * width]

    def release(self, entry: TensorEntry, start: int, stop: int) -> None:
        if entry.name not in self.sources:
            return self.inner.release(entry, start, stop)
        width = entry.shape[1]
        used = self.own[start // width: -(-stop // width)]
        used = used[used >= 0]
        if used.numel():          # the source rows this chunk read: nearly in order, so one span
            self.inner.release(self.sources[entry.name], used.min().item() * width, (used.max().item() + 1) * width)

    def prefetch(self, entry: TensorEntry, *args) -> None:
        self.inner.prefetch(self.sources.get(entry.name, entry), *args)

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()

    def _rows(self, name: str, first: int, end: int) -> torch.Tensor:
        """Output rows [first, end) of tensor `name`, in the stored dtype."""
        source = self.sources[name]
        table = self._table(name)
        out = torch.empty((end - first, source.shape[1]), dtype=source.torch_dtype)
        stop = min(end, self.vocab.tokens)
        if stop > first:
            own = self.own[first:stop]
            have = own >= 0
            out[:stop - first][have] = table[own[have]]
            lo, hi = torch.searchsorted(self.vocab.made_ids, torch.tensor([first, stop])).tolist()
            lacks = self.own[self.vocab.made_ids[lo:hi]] < 0      # a made row only where this model lacks one
            if lacks.any():
                out[self.vocab.made_ids[lo:hi][lacks] - first] = self._made(name, lo, hi)[lacks].to(out.dtype)
        if end > stop:
            out[max(0, stop - first):] = self._mean(name)
        return out

    def _made(self, name: str, lo: int, hi: int) -> torch.Tensor:
        """The made rows lo..hi (of vocab.made_ids), float32: the mean of the inputs' rows each names."""
        picked = self.vocab.made_from[lo:hi]
        total = torch.zeros((hi - lo, self.sources[name].shape[1]), dtype=torch.float32)
        for k, m in enumerate(self.inputs):
            rows = picked[:, k]
            some = rows >= 0
            if some.any():
                total[some] += m._table(name)[rows[some]].float()
        return total / (picked >= 0).sum(1, keepdim=True).clamp(min=1)

    def _mean(self, name: str) -> torch.Tensor:
        """The mean of this model's rows over the vocabulary (the padding rows' value), read once."""
        if name not in self.means:
            total, step = torch.zeros(self.sources[name].shape[1], dtype=torch.float64), 4096
            for a in range(0, self.vocab.tokens, step):
                total += self._rows(name, a, min(a + step, self.vocab.tokens)).double().sum(0)
            self.means[name] = (total / self.vocab.tokens).to(self.sources[name].torch_dtype)
        return self.means[name]

    def _table(self, name: str) -> torch.Tensor:
        """The tensor as read, [rows, width]: a zero-copy view of the mapped file (an adapter's embedding
        LoRA makes it whole, once per tensor)."""
        if self._tables[0] != name:
            e = self.sources[name]
            self._tables = (name, self.inner.chunk(e, 0, e.numel).view(e.shape))
        return self._tables[1]
