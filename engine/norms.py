"""The pre-pass of `--weights-from nan`: each expert's parameter norm over the tensors a merge merges,
streamed in pieces of whole 4096-element granules (float64 squares summed per granule as the methods sum
them, methods/_blocks.granule_sums; the granule sums added exactly with math.fsum), so the norms are the same
for any memory budget. It reads the models as the plan lays them out (methods/coefficients.py uses the norms).
"""
import math

from ..common.errors import BadParameter
from ..methods._blocks import granule_sums
from ..methods.contract import CHUNK_ALIGN
from .models import Models
from .plan import Plan


def expert_norms(models: Models, plan: Plan) -> list[float]:
    """||x_i||_2 over every merged tensor, per expert, in float64 (a zero norm is refused in one line)."""
    merged = [t for t in plan.tensors if t.merge]
    piece = max(CHUNK_ALIGN, plan.chunk_elems // CHUNK_ALIGN * CHUNK_ALIGN)   # elements read at once
    norms = []
    for model in models.experts:
        reader = model.reader(models.vocab)
        try:
            squares = (s for t in merged for s in _granule_squares(reader, model.index.tensors[t.name], piece))
            norms.append(math.sqrt(math.fsum(squares)))
        finally:
            reader.close()
        if norms[-1] == 0 or not math.isfinite(norms[-1]):
            raise BadParameter(f"{model.role}: its parameters have norm {norms[-1]}; --weights-from nan divides by it "
                               f"(check the model, or pass --weights)")
    return norms


def _granule_squares(reader, entry, piece: int):
    """The sums of x^2 (float64) over each 4096-element granule of a tensor, in order (the methods' own
    granule sums: a fixed order within each granule)."""
    for a in range(0, entry.numel, piece):
        z = min(a + piece, entry.numel)
        yield from granule_sums(reader.chunk(entry, a, z).double().square(), CHUNK_ALIGN).tolist()
        reader.release(entry, a, z)
