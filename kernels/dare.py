"""Counter-based random keep masks: the uniform of Triton's `tl.rand(seed, offset)`, bit for bit.

The mask of element j of a tensor is a pure function of (seed, tensor name, expert, j): it is
never stored, and any chunking, device or backend gives the same mask (Triton tutorial 04's
low-memory dropout). `uniform_ref` reproduces Philox-4x32-10 and Triton's int-to-float
conversion in int64 torch arithmetic; `dare_triton._uniform_kernel` is the Triton original.
An int64 offset's low and high 32 bits are Philox's first two counter words, as in Triton 3.x.

On the CPU, eager Philox costs about 39 ns per element (5.1 ms per 2^17-element chunk, 2 cores);
the compiled C loops (kernels/cpu.py: `uniforms`, and inside the fused DARE merges) draw the same
bits in about 1.3 ns per element, so the eager function is the reference and the fallback.
"""
import hashlib

import torch

ROUND_A, ROUND_B = 0xD2511F53, 0xCD9E8D57   # Philox-4x32 multipliers
KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85       # Weyl key increments
N_ROUNDS = 10
M32 = 0xFFFFFFFF
TO_UNIFORM = 4.6566127342e-10               # Triton's int32 -> [0, 1) scale


def expert_seed(seed: int, key: str, expert: int) -> int:
    """A 63-bit seed for one (global seed, tensor name, expert index)."""
    digest = hashlib.blake2b(f"{seed}\0{key}\0{expert}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def uniform_ref(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """float32 uniforms in [0, 1) equal to tl.rand(seed, offsets) (offsets int64).

    Each 32x32-bit product is an int64 product that wraps modulo 2^64, which keeps all 64 bits
    of the unsigned product (torch has no uint64 shifts); the tests check the result bit for
    bit against Triton's tl.rand. In-place ops: allocations dominate this integer-only chain.
    """
    k0, k1 = seed & M32, (seed >> 32) & M32
    offsets = offsets.to(torch.int64)
    c0, c1 = offsets & M32, offsets >> 32
    c2, c3 = torch.zeros_like(c0), torch.zeros_like(c0)             # updated in place below
    for _ in range(N_ROUNDS):
        pb, pa = c2.mul_(ROUND_B), c0.mul_(ROUND_A)                   # full 64-bit products
        c0 = (pb >> 32).bitwise_and_(M32).bitwise_xor_(c1).bitwise_xor_(k0)   # mulhi(B, c2) ^ c1 ^ k0
        c2 = (pa >> 32).bitwise_and_(M32).bitwise_xor_(c3).bitwise_xor_(k1)   # mulhi(A, c0) ^ c3 ^ k1
        c1, c3 = pb.bitwise_and_(M32), pa.bitwise_and_(M32)         # mullo(B, c2), mullo(A, c0)
        k0, k1 = (k0 + KEY_A) & M32, (k1 + KEY_B) & M32
    x = c0.to(torch.int32)                                           # bitcast: c0 < 2^32
    x ^= x >> 31                                                     # x < 0 ? -x - 1 : x
    return x.to(torch.float32).mul_(TO_UNIFORM)
