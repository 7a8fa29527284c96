"""The Triton twin of `dare.uniform_ref`: Triton's own tl.rand. Imported only when the Triton
backend is chosen (importing triton costs 0.24 s of start-up)."""
import torch
import triton
import triton.language as tl


@triton.jit
def _uniform_kernel(out_ptr,            # *f32 [n]
                    seed,               # i64 philox key
                    start,              # i64 element index of out[0] in the tensor
                    n,                  # i32 elements to write
                    BLOCK_SIZE: tl.constexpr):
    # offsets = torch.arange(start, start + n)
    offsets = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n
    # out = uniform_ref(seed, start + offsets)
    tl.store(out_ptr + offsets, tl.rand(seed, start + offsets), mask=mask)


def uniform_triton(seed: int, start: int, n: int, device) -> torch.Tensor:
    """tl.rand(seed, start + arange(n)) computed by the Triton kernel."""
    out = torch.empty(n, dtype=torch.float32, device=device)
    if n:
        _uniform_kernel[(triton.cdiv(n, 1024),)](out, seed, start, n, BLOCK_SIZE=1024)
    return out
