"""One vocabulary tensor (the token embedding or the head) rebuilt for the donor's tokens, a row chunk at a
time: rows the alignment matches are the model's rows, copied as stored; new tokens' rows are approximated
(approximate.py) for the chunk's new tokens at once, then noised and scaled; rows of no token are zero.
Chunks end where they would hold more than a batch of new tokens, so each approximation runs on a full
batch. Holds the dictionary (the donor's rows of the shared tokens, as stored) and one chunk; the model's and
the donor's tensors are read through their mapped views. Knows nothing of files or of the output.
"""
import bisect
import zlib
from dataclasses import dataclass

import torch

from . import approximate
from .options import NEED_DONOR_ROWS, Options
from .tokens import Alignment

ROW_BYTES = 16 << 20      # an output chunk's rows, as float32
STATE_BYTES = 128 << 20   # a batch's approximation state: omp's Q, [B, k, d'] float32


@dataclass(kw_only=True)
class Rebuild:
    name: str
    head: bool                              # the head (subword weighs pieces the other way)
    table: torch.Tensor                     # the model's tensor as stored [rows, d]
    donor: torch.Tensor | None              # the donor's counterpart [rows', d'] (omp, common_interpolation)
    alignment: Alignment
    pieces: list[list[int]] | None          # subword: the model's pieces of each new token
    options: Options

    def __post_init__(self):
        shared = torch.tensor(self.alignment.shared, dtype=torch.long).view(-1, 2)
        self.model_rows = shared[:, 1]                                # M's rows in the model's tensor
        needs_donor = self.options.method in NEED_DONOR_ROWS and self.alignment.new
        self.P = self.donor[shared[:, 0]] if needs_donor else None    # [n, d'] as stored
        self.mean = _mean_row(self.table) if self.options.method == "mean" else None
        seed = (self.options.seed * 1_000_003 + zlib.crc32(self.name.encode())) % 2 ** 62
        self.draws = [torch.Generator().manual_seed(seed + k) for k in (0, 1)]   # randn's rows, the noise

    def batch(self) -> int:
        """New tokens approximated at once: --batch-size, else as many as STATE_BYTES holds (at most 512,
        mergekit's batch)."""
        if self.options.batch_size:
            return self.options.batch_size
        width = self.donor.shape[1] if self.donor is not None else self.table.shape[1]
        return max(1, min(512, STATE_BYTES // (4 * self.options.k * width)))

    def chunks(self, out_dtype: torch.dtype):
        """(first row, rows [z - a, d] in out_dtype) in row order, covering the output's rows."""
        new, rows, width = self.alignment.new, self.alignment.rows, self.table.shape[1]
        most, batch = max(1, ROW_BYTES // (4 * width)), self.batch()
        a = 0
        while a < rows:
            lo, z = bisect.bisect_left(new, a), min(rows, a + most)
            if bisect.bisect_left(new, z) - lo > batch:
                z = new[lo + batch]
            hi = bisect.bisect_left(new, z)
            yield a, self._chunk(a, z, lo, hi, out_dtype)
            a = z

    def _chunk(self, a: int, z: int, lo: int, hi: int, out_dtype: torch.dtype) -> torch.Tensor:
        out = torch.zeros(z - a, self.table.shape[1], dtype=out_dtype)
        source = torch.tensor(self.alignment.source[a:z], dtype=torch.long)
        have = source >= 0
        out[have] = self.table[source[have]].to(out_dtype)
        if hi > lo:
            ids = torch.tensor(self.alignment.new[lo:hi], dtype=torch.long)
            out[ids - a] = self._new_rows(ids, lo, hi).to(out_dtype)
        return out

    def _new_rows(self, ids: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """The approximated rows of the new tokens `ids` (alignment.new[lo:hi]), noised and scaled, float32."""
        o = self.options
        if o.method in NEED_DONOR_ROWS:
            t = self.donor[ids]                                        # [B, d'] the targets
            if o.method == "omp":
                S, w = approximate.omp(t, self.P, o.k)
            else:
                S, dist = approximate.nearest(t, self.P, o.k, o.cosine_similarity)
                w = approximate.interpolation_weights(t, self.P[S], dist, o.weight_scheme, o.cosine_similarity)
            rows = approximate.combine(w, self.table, self.model_rows[S])
        elif o.method == "subword":
            rows = approximate.subword(self.table, self.pieces[lo:hi], o.subword_method, self.head)
        elif o.method == "mean":
            rows = self.mean.float().expand(len(ids), -1).clone()
        elif o.method == "randn":
            rows = _normal(len(ids), self.table.shape[1], self.draws[0])
        else:
            rows = torch.zeros(len(ids), self.table.shape[1])
        if o.new_vocab_noise:
            rows += _normal(len(ids), self.table.shape[1], self.draws[1]) * o.new_vocab_noise
        if o.new_vocab_scale:
            rows *= o.new_vocab_scale
        return rows


def _mean_row(table: torch.Tensor, step: int = 1024) -> torch.Tensor:
    """The mean of every row of the model's tensor, rounded to its dtype (mergekit takes it in that dtype)."""
    total = torch.zeros(table.shape[1], dtype=torch.float64)
    for a in range(0, table.shape[0], step):
        total += table[a:a + step].double().sum(0)
    return (total / table.shape[0]).to(table.dtype)


def _normal(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    """[n, d] standard normal draws, a row at a time: torch fills a large tensor in blocks, so one draw of n rows
    is not two draws of n/2; row by row, the rows do not depend on how the new tokens are batched."""
    return torch.stack([torch.randn(d, generator=g) for _ in range(n)]) if n else torch.zeros(0, d)
