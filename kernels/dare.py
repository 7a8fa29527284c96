"""Counter-based random keep masks: the uniform of Triton's `tl.rand(seed, offset)`, bit for bit.

The mask of element j of a tensor is a pure function of (seed, tensor name, expert, j): it is
never stored, and any chunking, device or backend gives the same mask (Triton tutorial 04's
low-memory dropout). `uniform_ref` reproduces Philox-4x32-10 and Triton's int-to-float
conversion in int64 torch arithmetic; `dare_triton._uniform_kernel` is the Triton original.
An int64 offset's low and high 32 bits are Philox's first two counter words, as in Triton 3.x.

On the CPU, eager Philox costs about 39 ns per element (5.1 ms per 2^17-element chunk, 2 cores):
a DARE merge of 595M parameters spent most of its 83 s there. Once a process has drawn
COMPILE_AFTER uniforms eagerly, `uniform_cpu` compiles the same function with torch.compile
(inductor fuses the ~120 integer ops into one loop: 2.6 ns per element; compiling costs 2-5 s,
so small merges never pay it) and runs it over fixed BLOCK-element blocks with the key as
tensors, so one compiled graph serves every seed and length. Without a working compiler it stays
eager; compile=False (--no-compile) keeps it eager.
"""
import hashlib
import sys

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
    return _philox(seed & M32, (seed >> 32) & M32, offsets.to(torch.int64))


def _philox(k0, k1, offsets: torch.Tensor) -> torch.Tensor:
    """uniform_ref with the key's two words given (ints, or 0-d int64 tensors when compiled)."""
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


COMPILE_AFTER = 1 << 26     # uniforms drawn eagerly first: ~2.6 s, the order of a compile
BLOCK = 1 << 16             # elements per compiled call (a fixed shape: one graph)
_drawn, _compiled = 0, None   # _compiled: None not tried, False failed or disabled, else the function


def uniform_cpu(seed: int, start: int, n: int, compile: bool = True) -> torch.Tensor:
    """uniform_ref(seed, arange(start, start + n)) on the CPU, compiled (if `compile`) once the
    process has drawn many (module docstring); bit-identical either way."""
    global _drawn
    fast = _fast() if compile and _drawn >= COMPILE_AFTER else None
    _drawn += n
    if not fast or n < BLOCK // 4:
        return uniform_ref(seed, torch.arange(start, start + n, dtype=torch.int64))
    k0, k1 = torch.tensor(seed & M32), torch.tensor((seed >> 32) & M32)
    out = torch.empty(n, dtype=torch.float32)
    for a in range(0, n, BLOCK):   # the last block is computed whole and cut
        z = min(a + BLOCK, n)
        out[a:z] = fast(k0, k1, torch.arange(start + a, start + a + BLOCK, dtype=torch.int64))[:z - a]
    return out


def _fast():
    """The compiled _philox, compiled and checked on first use; False if that is impossible."""
    global _compiled
    if _compiled is None:
        _compiled = False
        try:
            fn = torch.compile(_philox, dynamic=False)
            probe = torch.arange((1 << 32) - 5, (1 << 32) - 5 + BLOCK, dtype=torch.int64)
            if torch.equal(fn(torch.tensor(7), torch.tensor(9), probe), _philox(7, 9, probe)):
                _compiled = fn
        except Exception as e:  # no C++ compiler, an inductor failure: eager is exact too, only slower
            print(f"mbmerge: torch.compile unavailable ({type(e).__name__}); DARE masks stay eager",
                  file=sys.stderr)
    return _compiled
