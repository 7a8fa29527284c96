/* The fused CPU merges: the Triton kernels of merge_triton.py (and the radix histograms of
 * select.py, the Philox of dare.py) as C loops on AVX2 vectors of 8 floats, compiled once per
 * machine by kernels/cpu.py and called through ctypes. Each call reads its inputs once, in their
 * stored dtype, and writes its output once; threads share a call's elements through an atomic
 * cursor (`next`), PIECE at a time (take_pieces), so a thread on a busy core simply takes fewer pieces.
 *
 * Every float operation is the torch reference's, in its order (merge_triton.py documents the
 * correspondence line by line): IEEE single precision per lane, no FMA, so the results are
 * bit-identical to the torch methods on float32, and the bf16/fp16 casts round to nearest even as
 * torch's do. A block of at most BLOCK elements is converted to float32 arrays first (padded to
 * whole vectors), computed on, and converted back.
 */
#if !defined(__AVX2__) || !defined(__F16C__)
#error "the fused CPU merges need AVX2 and F16C (x86-64 since 2013); mbmerge uses its torch path instead"
#endif
#include <immintrin.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 512                    /* elements: the float32 arrays of a block stay in L1 */
#define V 8                          /* floats per AVX2 vector */

enum { F32 = 0, BF16 = 1, F16 = 2 };
enum { TRIM_NONE = 0, TRIM_BAND = 1, TRIM_RANDOM = 2 };
enum { ELECT_NONE = 0, ELECT_SUM = 1, ELECT_COUNT = 2 };

/* Each argument struct is a list of its fields, F(type, name), that both declares it (DECLARE) and
 * describes it to the tests (its rows of LAYOUT, at the end): kernels/cpu.py mirrors each as a ctypes
 * Structure, and tests/test_kernels_cpu.py holds the mirror to this layout field by field. */
#define DECLARE(type, name) type name;

#define MERGE_ARGS(F) \
    F(int64_t, n)                        /* elements in the chunk */ \
    F(int64_t, offset)                   /* element index of the chunk's first element in its tensor (Philox) */ \
    F(int64_t, piece)                    /* elements a thread takes at a time */ \
    F(int32_t, T) F(int32_t, trim) F(int32_t, elect) F(int32_t, mean) \
    F(const void *, b) F(int32_t, b_dt)  /* the base, or NULL */ \
    F(const void *const *, xs)           /* [T] the experts' chunks */ \
    F(const int32_t *, x_dt)             /* [T] their dtypes */ \
    /* [T] weight, band edges, keep rate, rescale gain */ \
    F(const float *, w) F(const float *, lo) F(const float *, hi) F(const float *, p) F(const float *, g) \
    F(const float *const *, pj)          /* [T] per-element keep rates at chunk positions (DELLA), or NULL each */ \
    F(int32_t, inverse)                  /* e_i / p_i(j) where per-element rates are given (DELLA's 'inverse') */ \
    /* [T] band: chunk positions before which ties are in the set */ \
    F(const int64_t *, lo_pos) F(const int64_t *, hi_pos) \
    F(const uint64_t *, seeds)           /* [T] Philox keys */ \
    F(float, div) F(float, scale) F(float, den0) \
    F(void *, out) F(int32_t, out_dt) \
    F(int64_t *, bad)                    /* [2 + T] this thread's blocks with non-finite values: output, base, experts */ \
    F(int64_t, granule)                  /* l1_sums: elements summed together (chunks start at multiples of it) */ \
    F(double *, sums)                    /* l1_sums: [2][T][granules] */ \
    /* l1_sums: [T] the keep bits it drew (bit k of byte j: chunk position 8j + k), or NULL */ \
    F(uint8_t *const *, keep_out) \
    F(const uint8_t *const *, keep_in)   /* delta_merge: [T] those bits, read instead of drawn again, or NULL */ \
    /* l1_sums: [T][2] (lo, step) of DELLA's keep rates, drawn experts' rates ranked row by row as the pass \
     * goes (granule: the row; no rates array written and read back), or NULL */ \
    F(const float *, ranks)
typedef struct { MERGE_ARGS(DECLARE) } merge_args;

/* ---- the threads' loop, shared by every kernel: a call's threads take pieces of its work (elements,
 * granules or rows) from one atomic cursor until none is left ---- */

/* A kernel's work on units [first, stop) of its call: a, its argument struct; own, this thread's scratch
 * (or NULL). */
typedef void (*piece_fn)(const void *a, void *own, int64_t first, int64_t stop);

/* Do fn on pieces of `piece` units of [0, total), taken from the cursor `next` that the call's threads
 * share, until none is left: the units this thread did. */
static int64_t take_pieces(int64_t *next, int64_t piece, int64_t total, piece_fn fn, const void *a, void *own) {
    int64_t done = 0;
    for (;;) {
        int64_t first = __atomic_fetch_add(next, piece, __ATOMIC_RELAXED);
        if (first >= total) return done;
        int64_t stop = first + piece < total ? first + piece : total;
        fn(a, own, first, stop);
        done += stop - first;
    }
}

/* ---- conversions: stored dtype <-> float32 arrays, whole vectors, then a scalar tail ---- */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {     /* round to nearest even; NaN as torch's 0x7FC0 */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if (f != f) return 0x7FC0;
    return (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

static void load_block(float *dst, const void *src, int dt, int64_t start, int64_t n) {
    int64_t j = 0;
    if (dt == F32) {
        memcpy(dst, (const float *)src + start, n * sizeof(float));
        j = n;
    } else if (dt == BF16) {
        const uint16_t *s = (const uint16_t *)src + start;
        for (; j + V <= n; j += V) {
            __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(s + j)));
            _mm256_storeu_ps(dst + j, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
        }
        for (; j < n; j++) dst[j] = bf16_to_f32(s[j]);
    } else {
        const uint16_t *s = (const uint16_t *)src + start;
        for (; j + V <= n; j += V) _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + j))));
        for (; j < n; j++) dst[j] = _cvtsh_ss(s[j]);
    }
    for (int64_t k = n; k < (n + V - 1) / V * V; k++) dst[k] = 0.0f;   /* whole vectors */
}

static void store_block(void *dst, int dt, int64_t start, const float *y, int64_t n) {
    int64_t j = 0;
    if (dt == F32) {
        memcpy((float *)dst + start, y, n * sizeof(float));
        return;
    }
    uint16_t *d = (uint16_t *)dst + start;
    if (dt == BF16) {
        const __m256i half = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1), nan = _mm256_set1_epi32(0x7FC0);
        for (; j + V <= n; j += V) {
            __m256 f = _mm256_loadu_ps(y + j);
            __m256i bits = _mm256_castps_si256(f);
            __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, half),
                                                           _mm256_and_si256(_mm256_srli_epi32(bits, 16), one)), 16);
            r = _mm256_blendv_epi8(r, nan, _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q)));
            __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
            _mm_storeu_si128((__m128i *)(d + j), _mm256_castsi256_si128(packed));
        }
        for (; j < n; j++) d[j] = f32_to_bf16(y[j]);
    } else {
        for (; j + V <= n; j += V)
            _mm_storeu_si128((__m128i *)(d + j), _mm256_cvtps_ph(_mm256_loadu_ps(y + j), _MM_FROUND_TO_NEAREST_INT));
        for (; j < n; j++) d[j] = _cvtss_sh(y[j], _MM_FROUND_TO_NEAREST_INT);
    }
}

/* ---- vector helpers ---- */

static inline __m256 vabs(__m256 x) { return _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF))); }

static inline __m256 vcopysign(__m256 mag, __m256 x) {   /* torch.copysign, signed zeros and NaN included */
    const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000u));
    return _mm256_or_ps(_mm256_andnot_ps(sign, mag), _mm256_and_ps(sign, x));
}

static inline __m256i not_finite(__m256 x) {             /* exponent all ones: Inf or NaN */
    const __m256i exp = _mm256_set1_epi32(0x7F800000);
    return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(x), exp), exp);
}

static inline int any(__m256i m) { return !_mm256_testz_si256(m, m); }

/* uniforms of Triton's tl.rand(seed, offset + k), k = 0..7 (kernels/dare.py uniform_ref): Philox-4x32-10
 * of (offset low, offset high, 0, 0); 32x32 -> 64-bit products of the even and odd lanes separately */
static inline void mulhilo(__m256i a, uint32_t m, __m256i *hi, __m256i *lo) {
    const __m256i mv = _mm256_set1_epi32((int)m);
    __m256i even = _mm256_mul_epu32(a, mv);                       /* lanes 0, 2, 4, 6 -> 64 bits */
    __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), mv); /* lanes 1, 3, 5, 7 */
    *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
    *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

static inline __m256 philox8(uint64_t seed, uint64_t offset) {
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32((int)(uint32_t)offset), lanes);
    /* the high word of offset + k carries when the low word wraps */
    __m256i wrapped = _mm256_cmpgt_epi32(_mm256_xor_si256(_mm256_set1_epi32((int)(uint32_t)offset), _mm256_set1_epi32((int)0x80000000u)),
                                         _mm256_xor_si256(c0, _mm256_set1_epi32((int)0x80000000u)));
    __m256i c1 = _mm256_sub_epi32(_mm256_set1_epi32((int)(uint32_t)(offset >> 32)), wrapped);
    __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
    for (int r = 0; r < 10; r++) {
        __m256i hb, lb, ha, la;
        mulhilo(c2, 0xCD9E8D57u, &hb, &lb);
        mulhilo(c0, 0xD2511F53u, &ha, &la);
        c0 = _mm256_xor_si256(_mm256_xor_si256(hb, c1), _mm256_set1_epi32((int)k0));
        c2 = _mm256_xor_si256(_mm256_xor_si256(ha, c3), _mm256_set1_epi32((int)k1));
        c1 = lb;
        c3 = la;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    __m256i x = _mm256_xor_si256(c0, _mm256_srai_epi32(c0, 31));   /* x < 0 ? -x - 1 : x */
    return _mm256_mul_ps(_mm256_cvtepi32_ps(x), _mm256_set1_ps(4.6566127342e-10f));
}

/* the same 16 at a time in AVX-512F vectors, bit for bit (its own mulhi/lo: the low product in one multiply);
 * 1.7 against 2.6 ns an element on this project's AMD EPYC (Zen 4 runs 512-bit operations in two halves) */
#define AVX512 __attribute__((target("avx512f")))

AVX512 static inline void mulhilo16(__m512i a, uint32_t m, __m512i *hi, __m512i *lo) {
    const __m512i mv = _mm512_set1_epi32((int)m);
    __m512i even = _mm512_mul_epu32(a, mv), odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), mv);
    *lo = _mm512_mullo_epi32(a, mv);
    *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

AVX512 static inline __m512 philox16(uint64_t seed, uint64_t offset) {
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    const __m512i low = _mm512_set1_epi32((int)(uint32_t)offset), high = _mm512_set1_epi32((int)(uint32_t)(offset >> 32));
    __m512i c0 = _mm512_add_epi32(low, _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    /* the high word of offset + k carries when the low word wraps */
    __m512i c1 = _mm512_mask_add_epi32(high, _mm512_cmplt_epu32_mask(c0, low), high, _mm512_set1_epi32(1));
    __m512i c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
    for (int r = 0; r < 10; r++) {
        __m512i hb, lb, ha, la;
        mulhilo16(c2, 0xCD9E8D57u, &hb, &lb);
        mulhilo16(c0, 0xD2511F53u, &ha, &la);
        c0 = _mm512_ternarylogic_epi32(hb, c1, _mm512_set1_epi32((int)k0), 0x96);     /* hb ^ c1 ^ k0 */
        c2 = _mm512_ternarylogic_epi32(ha, c3, _mm512_set1_epi32((int)k1), 0x96);
        c1 = lb;
        c3 = la;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    __m512i x = _mm512_xor_si512(c0, _mm512_srai_epi32(c0, 31));
    return _mm512_mul_ps(_mm512_cvtepi32_ps(x), _mm512_set1_ps(4.6566127342e-10f));
}

AVX512 static void philox_fill16(uint64_t seed, uint64_t offset, int64_t n, float *u) {
    for (int64_t j = 0; j < n; j += 16) _mm512_storeu_ps(u + j, philox16(seed, offset + j));
}

static void philox_fill8(uint64_t seed, uint64_t offset, int64_t n, float *u) {
    for (int64_t j = 0; j < n; j += V) _mm256_storeu_ps(u + j, philox8(seed, offset + j));
}

static int32_t lanes_chosen;       /* 0 until the first draw, then 8 or 16 */

/* The Philox lanes a draw uses: 16 where the CPU (and the OS) has AVX-512F, else 8; `want` 8 or 16 sets
 * them (16 only where available: the tests hold both to tl.rand), 0 reads them. */
int32_t philox_lanes(int32_t want) {
    __builtin_cpu_init();
    int32_t wide = __builtin_cpu_supports("avx512f") ? 16 : 8;
    if (want == 8 || want == 16) __atomic_store_n(&lanes_chosen, want == 16 ? wide : 8, __ATOMIC_RELAXED);
    else if (!__atomic_load_n(&lanes_chosen, __ATOMIC_RELAXED)) __atomic_store_n(&lanes_chosen, wide, __ATOMIC_RELAXED);
    return __atomic_load_n(&lanes_chosen, __ATOMIC_RELAXED);
}

/* u[0..n) = tl.rand(seed, offset + k); writes whole vectors of 16: u has room for n rounded up to 16 */
static void philox_fill(uint64_t seed, uint64_t offset, int64_t n, float *u) {
    int32_t lanes = __atomic_load_n(&lanes_chosen, __ATOMIC_RELAXED);
    if (!lanes) lanes = philox_lanes(0);
    (lanes == 16 ? philox_fill16 : philox_fill8)(seed, offset, n, u);
}

/* ---- the merge of one block ---- */

typedef struct { const void *p; int dt; } src_t;   /* a stored array, read 8 floats at a time */

#define ALWAYS static inline __attribute__((always_inline))

/* 8 floats of a stored array at k; dt is a constant in the specialised loops below (MIXED: s.dt) */
#define MIXED 3
ALWAYS __m256 vload(src_t s, int64_t k, const int dt) {
    int t = dt == MIXED ? s.dt : dt;
    if (t == F32) return _mm256_loadu_ps((const float *)s.p + k);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)s.p + k));
    if (t == BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}

/* y as dt at k; whether a stored value is not finite (the cast may overflow a finite y) */
static inline __m256i vstore(void *dst, int dt, int64_t k, __m256 y) {
    if (dt == F32) {
        _mm256_storeu_ps((float *)dst + k, y);
        return not_finite(y);
    }
    __m256i r;
    if (dt == BF16) {
        __m256i bits = _mm256_castps_si256(y);
        r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)),
                                               _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1))), 16);
        r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(y, y, _CMP_UNORD_Q)));
        _mm_storeu_si128((__m128i *)((uint16_t *)dst + k),
                         _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8)));
        return not_finite(_mm256_castsi256_ps(_mm256_slli_epi32(r, 16)));
    }
    __m128i h = _mm256_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128((__m128i *)((uint16_t *)dst + k), h);
    return not_finite(_mm256_cvtph_ps(h));
}

/* a band edge: [|d| > t or (|d| = t and position < pos)] for the 8 elements at chunk position at */
ALWAYS __m256 in_cut(__m256 v, float t, int64_t pos, int64_t at) {
    int64_t lim = pos - at;                  /* compared as offsets within the vector: int32 */
    __m256i before = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(lim < 0 ? 0 : lim > V ? V : lim)),
                                        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256 tv = _mm256_set1_ps(t);
    return _mm256_or_ps(_mm256_cmp_ps(v, tv, _CMP_GT_OQ),
                        _mm256_and_ps(_mm256_cmp_ps(v, tv, _CMP_EQ_OQ), _mm256_castsi256_ps(before)));
}

/* whether expert i's keep mask is drawn from Philox uniforms (not handed over as bits, not all kept) */
static inline int draws(const merge_args *a, int i) {
    return !(a->keep_in && a->keep_in[i]) && (a->pj[i] || a->p[i] < 1);
}

/* expert i's kept mask (merge_triton._keep) for the 8 elements at chunk position at; u: their uniforms
 * where the mask is drawn (draws) */
ALWAYS __m256 keep8(const merge_args *a, int i, __m256 d, int64_t at, const float *u, const int trim) {
    const __m256 all = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    if (trim == TRIM_BAND) {
        __m256 v = vabs(d);
        __m256 kept = a->lo[i] > 0 ? in_cut(v, a->lo[i], a->lo_pos[i], at) : all;
        __m256 dropped = a->hi[i] != INFINITY ? in_cut(v, a->hi[i], a->hi_pos[i], at) : _mm256_setzero_ps();
        return _mm256_andnot_ps(dropped, kept);
    }
    if (trim == TRIM_RANDOM && a->keep_in && a->keep_in[i]) {   /* the L1 pass's draws (at is a multiple of 8) */
        const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        __m256i byte = _mm256_set1_epi32(a->keep_in[i][at >> 3]);
        return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(byte, bit), bit));
    }
    if (trim == TRIM_RANDOM && a->pj[i])       /* DELLA: the rate of each element (its array is padded) */
        return _mm256_cmp_ps(_mm256_loadu_ps(u), _mm256_loadu_ps(a->pj[i] + at), _CMP_LT_OQ);
    if (trim == TRIM_RANDOM && a->p[i] < 1)
        return _mm256_cmp_ps(_mm256_loadu_ps(u), _mm256_set1_ps(a->p[i]), _CMP_LT_OQ);
    return all;
}

/* e_i = w_i * kept_i (merge_triton._term; DELLA's inverse rescale divides by the element's rate) */
ALWAYS __m256 term8(const merge_args *a, int i, __m256 d, __m256 keep, int64_t at, const int trim) {
    __m256 w = _mm256_set1_ps(a->w[i]);
    if (trim == TRIM_BAND) return _mm256_mul_ps(vcopysign(_mm256_and_ps(keep, vabs(d)), d), w);
    if (trim == TRIM_RANDOM) {
        __m256 e = _mm256_mul_ps(d, _mm256_and_ps(keep, _mm256_set1_ps(1.0f)));
        if (a->pj[i] && a->inverse) e = _mm256_div_ps(e, _mm256_loadu_ps(a->pj[i] + at));
        return _mm256_mul_ps(_mm256_mul_ps(e, _mm256_set1_ps(a->g[i])), w);
    }
    return _mm256_mul_ps(d, w);
}

ALWAYS __m256 delta8(src_t x, const src_t *b, int64_t k, __m256i *bad, const int dt, const int has_b) {
    __m256 d = vload(x, k, dt);
    *bad = _mm256_or_si256(*bad, not_finite(d));
    return has_b ? _mm256_sub_ps(d, vload(*b, k, dt)) : d;
}

/* n elements (whole vectors) read at k0 of the sources, written at k0 of out; pos: the chunk position
 * of the first (band cuts, Philox counters). dt, trim, elect, has_b: constants of a specialised copy. */
ALWAYS void merge_vectors(const merge_args *a, const src_t *b, const src_t *xs, void *out, int out_dt,
                          int64_t k0, int64_t pos, int64_t n, const int dt, const int trim, const int elect,
                          const int has_b) {
    float total[BLOCK] __attribute__((aligned(32)));
    uint32_t keeps[BLOCK] __attribute__((aligned(32)));  /* keep_i in bit i: the second pass does not redo Philox */
    const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
    float u[BLOCK + 16] __attribute__((aligned(64)));         /* a block's uniforms, whole vectors of 16 */
    for (int i = 0; i < a->T; i++) {
        __m256i bad = _mm256_setzero_si256();
        const __m256i bit = _mm256_set1_epi32((int)(1u << i));
        if (trim == TRIM_RANDOM && draws(a, i)) philox_fill(a->seeds[i], (uint64_t)(a->offset + pos), n, u);
        for (int64_t j = 0; j < n; j += V) {
            __m256 d = delta8(xs[i], b, k0 + j, &bad, dt, has_b);
            __m256 keep = keep8(a, i, d, pos + j, u + j, trim);
            __m256 e = term8(a, i, d, keep, pos + j, trim);
            if (elect == ELECT_COUNT)                                      /* torch.sign: 0 for 0 and NaN */
                e = _mm256_sub_ps(_mm256_and_ps(_mm256_cmp_ps(e, zero, _CMP_GT_OQ), one),
                                  _mm256_and_ps(_mm256_cmp_ps(e, zero, _CMP_LT_OQ), one));
            __m256 t = i == 0 ? _mm256_set1_ps(-0.0f) : _mm256_load_ps(total + j);   /* -0.0: the exact identity */
            _mm256_store_ps(total + j, _mm256_add_ps(t, e));
            if (elect != ELECT_NONE) {
                __m256i kb = _mm256_and_si256(_mm256_castps_si256(keep), bit);
                _mm256_store_si256((__m256i *)(keeps + j),
                                   i == 0 ? kb : _mm256_or_si256(_mm256_load_si256((const __m256i *)(keeps + j)), kb));
            }
        }
        a->bad[2 + i] += any(bad);
    }
    float mag[BLOCK] __attribute__((aligned(32))), den[BLOCK] __attribute__((aligned(32)));
    if (elect != ELECT_NONE) {                                              /* _blocks.elect and disjoint_merge */
        __m256i ignored = _mm256_setzero_si256();
        for (int i = 0; i < a->T; i++) {
            const __m256i bit = _mm256_set1_epi32((int)(1u << i));
            const __m256 w = _mm256_set1_ps(a->w[i]);
            for (int64_t j = 0; j < n; j += V) {
                __m256 d = delta8(xs[i], b, k0 + j, &ignored, dt, has_b);
                __m256 keep = _mm256_castsi256_ps(_mm256_cmpeq_epi32(
                    _mm256_and_si256(_mm256_load_si256((const __m256i *)(keeps + j)), bit), bit));
                __m256 s = vcopysign(one, _mm256_load_ps(total + j));                  /* the elected sign */
                __m256 v = _mm256_mul_ps(term8(a, i, d, keep, pos + j, trim), s);
                v = _mm256_andnot_ps(_mm256_cmp_ps(v, zero, _CMP_LT_OQ), v);            /* v < 0 ? 0 : v */
                __m256 m0 = i == 0 ? zero : _mm256_load_ps(mag + j), d0 = i == 0 ? zero : _mm256_load_ps(den + j);
                _mm256_store_ps(mag + j, _mm256_add_ps(m0, v));
                _mm256_store_ps(den + j, _mm256_add_ps(d0, _mm256_and_ps(_mm256_cmp_ps(v, zero, _CMP_GT_OQ), w)));
            }
        }
    }
    __m256i bad_b = _mm256_setzero_si256(), bad_out = _mm256_setzero_si256();
    const __m256 scale = _mm256_set1_ps(a->scale), den0 = _mm256_set1_ps(a->den0), div = _mm256_set1_ps(a->div);
    for (int64_t j = 0; j < n; j += V) {
        __m256 m;
        if (elect == ELECT_NONE) {
            m = _mm256_div_ps(_mm256_load_ps(total + j), div);
        } else {
            m = _mm256_mul_ps(_mm256_load_ps(mag + j), vcopysign(one, _mm256_load_ps(total + j)));
            if (a->mean) {
                __m256 dv = _mm256_load_ps(den + j);
                m = _mm256_div_ps(m, _mm256_blendv_ps(dv, den0, _mm256_cmp_ps(dv, zero, _CMP_EQ_OQ)));
            }
        }
        __m256 y = _mm256_mul_ps(m, scale);
        if (has_b) {
            __m256 bv = vload(*b, k0 + j, dt);
            bad_b = _mm256_or_si256(bad_b, not_finite(bv));
            y = _mm256_add_ps(bv, y);
        }
        bad_out = _mm256_or_si256(bad_out, vstore(out, out_dt, k0 + j, y));
    }
    a->bad[0] += any(bad_out);
    a->bad[1] += any(bad_b);
}

/* the copies of merge_vectors for every (dtype, trim, election, base): no branch in their loops */
#define WITH_B(dt, trim, elect) \
    (has_b ? merge_vectors(a, b, xs, out, out_dt, k0, pos, n, dt, trim, elect, 1) \
           : merge_vectors(a, b, xs, out, out_dt, k0, pos, n, dt, trim, elect, 0))
#define WITH_ELECT(dt, trim) \
    (elect == ELECT_NONE ? WITH_B(dt, trim, ELECT_NONE) : elect == ELECT_SUM ? WITH_B(dt, trim, ELECT_SUM) \
                                                       : WITH_B(dt, trim, ELECT_COUNT))
#define WITH_TRIM(dt) \
    (trim == TRIM_NONE ? WITH_ELECT(dt, TRIM_NONE) : trim == TRIM_BAND ? WITH_ELECT(dt, TRIM_BAND) \
                                                    : WITH_ELECT(dt, TRIM_RANDOM))

static void merge_run(const merge_args *a, const src_t *b, const src_t *xs, void *out, int out_dt, int64_t k0,
                      int64_t pos, int64_t n) {
    int trim = a->trim, elect = a->elect, has_b = b != NULL, dt = xs[0].dt;
    for (int i = 0; i < a->T; i++) dt = xs[i].dt == dt ? dt : MIXED;
    if (has_b && b->dt != dt) dt = MIXED;
    dt == F32 ? WITH_TRIM(F32) : dt == BF16 ? WITH_TRIM(BF16) : dt == F16 ? WITH_TRIM(F16) : WITH_TRIM(MIXED);
}

static void merge_block(const merge_args *a, int64_t start, int64_t n) {
    src_t b = {a->b, a->b_dt}, xs[32];
    for (int i = 0; i < a->T; i++) xs[i] = (src_t){a->xs[i], a->x_dt[i]};
    int64_t full = n / V * V;
    if (full) merge_run(a, a->b ? &b : NULL, xs, a->out, a->out_dt, start, start, full);
    if (full == n) return;
    /* the last few elements: through padded float32 copies, the same vector code */
    float bt[V] __attribute__((aligned(32))), xt[32][V] __attribute__((aligned(32))), yt[V] __attribute__((aligned(32)));
    src_t tb = {bt, F32}, txs[32];
    if (a->b) load_block(bt, a->b, a->b_dt, start + full, n - full);
    for (int i = 0; i < a->T; i++) {
        load_block(xt[i], a->xs[i], a->x_dt[i], start + full, n - full);
        txs[i] = (src_t){xt[i], F32};
    }
    merge_run(a, a->b ? &tb : NULL, txs, yt, F32, 0, start + full, V);
    store_block(a->out, a->out_dt, start + full, yt, n - full);
    float stored[V] __attribute__((aligned(32)));                  /* as stored: the cast may overflow */
    load_block(stored, a->out, a->out_dt, start + full, n - full);
    a->bad[0] += any(not_finite(_mm256_load_ps(stored)));
}

static void merge_piece(const void *args, void *own, int64_t first, int64_t stop) {
    for (int64_t s = first; s < stop; s += BLOCK) merge_block(args, s, stop - s < BLOCK ? stop - s : BLOCK);
}

/* Merge pieces of the chunk until none is left, counting blocks with non-finite values into a->bad. */
void delta_merge(const merge_args *a, int64_t *next) {
    take_pieces(next, a->piece, a->n, merge_piece, a, NULL);
}

/* ---- DELLA's keep rates: p(j) = lo + step * r(j), r(j) = the ascending rank of |x_j - b_j| in its row of m
 * (ties by position) / (m - 1), 1/2 if m = 1 (della_magprune._rank01), by a stable LSD radix sort per row ---- */

#define RATE_ARGS(F) \
    F(int64_t, rows) F(int64_t, m) F(int64_t, piece) /* piece: rows a thread takes at a time */ \
    F(const void *, b) F(int32_t, b_dt)  /* the base, or NULL (x is then the delta) */ \
    F(const void *, x) F(int32_t, x_dt) \
    F(float, lo) F(float, step) \
    F(float *, out)
typedef struct { RATE_ARGS(DECLARE) } rate_args;

/* the row's keys |x - b| as float32 bits (NaN as 0x7FC00000: last, equal among themselves) for n elements
 * (whole vectors) at k; the bits that vary among them are or ^ and */
ALWAYS void row_keys(const src_t *b, src_t x, int64_t k, int64_t n, uint32_t *keys, __m256i *or, __m256i *and,
                     const int dt, const int has_b) {
    __m256i ignored = _mm256_setzero_si256();
    const __m256i nan = _mm256_set1_epi32(0x7FC00000);
    for (int64_t j = 0; j < n; j += V) {
        __m256 d = vabs(delta8(x, b, k + j, &ignored, dt, has_b));
        __m256i key = _mm256_blendv_epi8(_mm256_castps_si256(d), nan, _mm256_castps_si256(_mm256_cmp_ps(d, d, _CMP_UNORD_Q)));
        _mm256_storeu_si256((__m256i *)(keys + j), key);
        *or = _mm256_or_si256(*or, key);
        *and = _mm256_and_si256(*and, key);
    }
}

#define ROW_KEYS(dt) (has_b ? row_keys(b, x, k, n, keys, or, and, dt, 1) : row_keys(b, x, k, n, keys, or, and, dt, 0))

static void keys_run(const src_t *b, src_t x, int64_t k, int64_t n, uint32_t *keys, __m256i *or, __m256i *and) {
    int has_b = b != NULL, dt = has_b && b->dt != x.dt ? MIXED : x.dt;
    dt == F32 ? ROW_KEYS(F32) : dt == BF16 ? ROW_KEYS(BF16) : dt == F16 ? ROW_KEYS(F16) : ROW_KEYS(MIXED);
}

/* Digits of at most DIGIT bits, as few passes as the varying bits need: bf16 deltas vary in 16-23 bits
 * (measured on the bench fixture), two passes where 8-bit digits took three. */
#define DIGIT 11

/* every digit's histogram in one pass over the keys, even and odd elements apart (a run of equal digits
 * bumps one counter over and over, each increment waiting on the last); passes: a constant of each copy */
ALWAYS void count_digits(const uint32_t *keys, int64_t m, uint32_t *count, int low, int width, const int passes) {
    const uint32_t bins = 1u << width, mask = bins - 1;
    for (int64_t j = 0; j < m; j++)
        for (int p = 0; p < passes; p++) count[(2 * p + (j & 1)) * bins + ((keys[j] >> (low + width * p)) & mask)]++;
}

/* uint32s of a thread's scratch to rank rows of m: keys and positions twice over, the digits' counts */
static size_t rank_room(int64_t m) {
    return 4 * (size_t)m + (2 * ((32 + DIGIT - 1) / DIGIT) << DIGIT);
}

/* rate[k] = the rate of the k-th smallest of a row of m */
static void rate_table(float *rate, int64_t m, float lo, float step) {
    const float below = (float)(m - 1);
    for (int64_t k = 0; k < m; k++) rate[k] = (m == 1 ? 0.5f : (float)k / below) * step + lo;
}

/* row's rates into out[0..m); scratch: rank_room(m) */
static void rank_row(const rate_args *a, int64_t row, const float *rate, uint32_t *scratch, float *out) {
    const int64_t m = a->m, first = row * m, full = m / V * V;
    uint32_t *keys = scratch, *idx = scratch + m, *keys2 = scratch + 2 * m, *idx2 = scratch + 3 * m,
             *count = scratch + 4 * m;
    src_t b = {a->b, a->b_dt}, x = {a->x, a->x_dt};
    __m256i or = _mm256_setzero_si256(), and = _mm256_set1_epi32(-1);
    keys_run(a->b ? &b : NULL, x, first, full, keys, &or, &and);
    if (full < m) {                                             /* the last few, through padded copies */
        float bt[V] __attribute__((aligned(32))), xt[V] __attribute__((aligned(32)));
        uint32_t tail[V] __attribute__((aligned(32)));
        if (a->b) load_block(bt, a->b, a->b_dt, first + full, m - full);
        load_block(xt, a->x, a->x_dt, first + full, m - full);
        src_t tb = {bt, F32}, tx = {xt, F32};
        __m256i tor = _mm256_setzero_si256(), tand = _mm256_set1_epi32(-1);
        keys_run(a->b ? &tb : NULL, tx, 0, V, tail, &tor, &tand);
        for (int64_t j = full; j < m; j++) keys[j] = tail[j - full];
    }
    uint32_t lanes_or[V], lanes_and[V], any = 0, all = ~0u;
    _mm256_storeu_si256((__m256i *)lanes_or, or);
    _mm256_storeu_si256((__m256i *)lanes_and, and);
    for (int l = 0; l < V; l++) any |= lanes_or[l], all &= lanes_and[l];
    for (int64_t j = full; j < m; j++) any |= keys[j], all &= keys[j];
    uint32_t varying = any ^ all;
    if (!varying) {                                             /* all equal: ranks by position */
        for (int64_t k = 0; k < m; k++) out[k] = rate[k];
        return;
    }
    /* LSD from the lowest varying bit to the highest */
    const int low = __builtin_ctz(varying), bits = 32 - __builtin_clz(varying) - low;
    const int passes = (bits + DIGIT - 1) / DIGIT, width = (bits + passes - 1) / passes;
    const uint32_t bins = 1u << width, mask = bins - 1;
    memset(count, 0, sizeof(uint32_t) * 2 * bins * passes);
    passes == 1 ? count_digits(keys, m, count, low, width, 1) : passes == 2 ? count_digits(keys, m, count, low, width, 2)
                                                            : count_digits(keys, m, count, low, width, 3);
    for (int p = 0; p < passes; p++) {
        const int shift = low + width * p;
        uint32_t *c = count + 2 * p * bins, *c1 = c + bins, at = 0;
        for (uint32_t d = 0; d < bins; d++) {
            uint32_t n = c[d] + c1[d];
            c[d] = at;
            at += n;
        }
        if (p == passes - 1) {                                  /* the last digit places each element: its rate */
            for (int64_t j = 0; j < m; j++) out[p ? idx[j] : (uint32_t)j] = rate[c[(keys[j] >> shift) & mask]++];
            return;
        }
        for (int64_t j = 0; j < m; j++) {
            uint32_t to = c[(keys[j] >> shift) & mask]++;
            keys2[to] = keys[j];
            idx2[to] = p ? idx[j] : (uint32_t)j;                /* the first pass's order is the row's */
        }
        uint32_t *t = keys; keys = keys2; keys2 = t;
        t = idx; idx = idx2; idx2 = t;
    }
}

static void rank_piece(const void *args, void *own, int64_t first, int64_t stop) {
    const rate_args *a = args;
    const float *rate = own;
    uint32_t *scratch = (uint32_t *)own + a->m;
    for (int64_t row = first; row < stop; row++) rank_row(a, row, rate, scratch, a->out + row * a->m);
}

/* Rank rows until none is left; the rows this thread ranked (the caller checks they add up: a thread
 * whose scratch could not be allocated takes none). */
int64_t keep_rates(const rate_args *a, int64_t *next) {
    float *own = malloc((a->m + rank_room(a->m)) * sizeof(uint32_t));   /* the rate table, then rank_row's */
    if (!own) return 0;
    rate_table(own, a->m, a->lo, a->step);
    int64_t done = take_pieces(next, a->piece, a->rows, rank_piece, a, own);
    free(own);
    return done;
}

/* ---- mergekit's L1 rescale (dare_drop and della_magprune rescale_gains): per granule of the chunk, the
 * float64 sums of |d_i| and of |keep_i d_i|, each folded as _blocks.granule_sums folds (zero-padded to a
 * power of two, the upper half added to the lower until one value is left): the torch path's bits ---- */

static double fold(double *v, int64_t width) {
    for (int64_t h = width / 2; h >= 1; h /= 2)
        for (int64_t j = 0; j < h; j++) v[j] += v[j + h];
    return v[0];
}

#define FOLD_ARGS(F) \
    F(int64_t, n) F(int64_t, granule) F(int64_t, piece) /* piece: granules a thread takes at a time */ \
    F(const float *, v) \
    F(double *, out)                     /* [granules] */
typedef struct { FOLD_ARGS(DECLARE) } fold_args;

/* the doubles a granule of G is folded in: the power of two at or above G */
static int64_t fold_width(int64_t G) {
    int64_t width = 1;
    while (width < G) width *= 2;
    return width;
}

static void fold_piece(const void *args, void *own, int64_t first, int64_t stop) {
    const fold_args *a = args;
    const int64_t width = fold_width(a->granule);
    double *v = own;
    for (int64_t g = first; g < stop; g++) {
        int64_t start = g * a->granule, len = a->n - start < a->granule ? a->n - start : a->granule;
        for (int64_t j = 0; j < len; j++) v[j] = (double)a->v[start + j];
        for (int64_t j = len; j < width; j++) v[j] = 0.0;
        a->out[g] = fold(v, width);
    }
}

/* _blocks.granule_sums of float32 values: each granule widened to float64 and folded; the granules
 * this thread summed (none where its scratch could not be allocated) */
int64_t fold_sums(const fold_args *a, int64_t *next) {
    double *v = malloc((size_t)fold_width(a->granule) * sizeof(double));
    if (!v) return 0;
    int64_t done = take_pieces(next, a->piece, (a->n + a->granule - 1) / a->granule, fold_piece, a, v);
    free(v);
    return done;
}

ALWAYS void store_pd(double *dst, __m256 v) {
    _mm256_storeu_pd(dst, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    _mm256_storeu_pd(dst + 4, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
}

/* A thread's scratch for l1_sums: the fold's doubles, and where DELLA's rates are ranked, rank_row's
 * scratch, each expert's rate table and one row's rates (padded to whole vectors). */
typedef struct { double *full, *kept; uint32_t *rank; float *table, *row; } l1_scratch;

/* granule g, for each expert: full and kept hold `width` doubles (and at least a whole vector) */
static void l1_granule(const merge_args *a, int64_t g, int64_t width, const l1_scratch *t, float *xs,
                       float *bs, float *u) {
    const int64_t G = a->granule, start = g * G, len = a->n - start < G ? a->n - start : G;
    const int64_t granules = (a->n + G - 1) / G, room = width > V ? width : V;
    const __m256 one = _mm256_set1_ps(1.0f);
    double *full = t->full, *kept = t->kept;
    for (int i = 0; i < a->T; i++) {
        const int ranked = a->ranks && draws(a, i);
        if (ranked) {                                           /* the row's rates, as keep_rates gives them */
            rate_args r = {.rows = granules, .m = G, .b = a->b, .b_dt = a->b_dt, .x = a->xs[i], .x_dt = a->x_dt[i]};
            rank_row(&r, g, t->table + i * G, t->rank, t->row);
        }
        const int64_t written = (len + V - 1) / V * V;                 /* the loop below writes whole vectors */
        memset(full + written, 0, (size_t)(room - written) * sizeof(double));
        memset(kept + written, 0, (size_t)(room - written) * sizeof(double));
        for (int64_t s = 0; s < len; s += BLOCK) {
            int64_t n = len - s < BLOCK ? len - s : BLOCK;
            load_block(xs, a->xs[i], a->x_dt[i], start + s, n);      /* zeros past n: |d| = 0 there */
            if (a->b) load_block(bs, a->b, a->b_dt, start + s, n);
            if (draws(a, i)) philox_fill(a->seeds[i], (uint64_t)(a->offset + start + s), n, u);
            for (int64_t j = 0; j < n; j += V) {
                __m256 d = _mm256_load_ps(xs + j);
                if (a->b) d = _mm256_sub_ps(d, _mm256_load_ps(bs + j));
                __m256 keep = ranked ? _mm256_cmp_ps(_mm256_load_ps(u + j), _mm256_loadu_ps(t->row + s + j), _CMP_LT_OQ)
                                     : keep8(a, i, d, start + s + j, u + j, TRIM_RANDOM);
                if (a->keep_out && a->keep_out[i]) a->keep_out[i][(start + s + j) >> 3] = (uint8_t)_mm256_movemask_ps(keep);
                store_pd(full + s + j, vabs(d));
                store_pd(kept + s + j, vabs(_mm256_mul_ps(d, _mm256_and_ps(keep, one))));  /* [u < p] * d */
            }
        }
        a->sums[i * granules + g] = fold(full, width);
        a->sums[(a->T + i) * granules + g] = fold(kept, width);
    }
}

static void l1_piece(const void *args, void *own, int64_t first, int64_t stop) {
    const merge_args *a = args;
    const int64_t width = fold_width(a->granule);
    float xs[BLOCK] __attribute__((aligned(32))), bs[BLOCK] __attribute__((aligned(32)));
    float u[BLOCK + 16] __attribute__((aligned(64)));
    for (int64_t g = first; g < stop; g++) l1_granule(a, g, width, own, xs, bs, u);
}

/* Sum granules (a->piece at a time) until none is left; the granules this thread summed (the caller
 * checks they add up: a thread whose scratch could not be allocated takes none). */
int64_t l1_sums(const merge_args *a, int64_t *next) {
    const int64_t G = a->granule, width = fold_width(G), room = width > V ? width : V;
    const size_t ranked = a->ranks ? rank_room(G) + (size_t)(a->T + 1) * G + V : 0;      /* 4-byte words */
    char *own = aligned_alloc(32, (2 * room * sizeof(double) + ranked * 4 + 31) / 32 * 32);
    if (!own) return 0;
    l1_scratch t = {(double *)own, (double *)own + room};
    if (a->ranks) {
        t.rank = (uint32_t *)(t.kept + room);
        t.table = (float *)(t.rank + rank_room(G));
        t.row = t.table + a->T * G;
        for (int i = 0; i < a->T; i++) rate_table(t.table + i * G, G, a->ranks[2 * i], a->ranks[2 * i + 1]);
        for (int k = 0; k < V; k++) t.row[G + k] = 1.0f;       /* past the row: d = 0 there */
    }
    int64_t done = take_pieces(next, a->piece, (a->n + G - 1) / G, l1_piece, a, &t);
    free(own);
    return done;
}

/* ---- the radix-select histograms of |x_i - b| (select.py), and the ties of a Cut ---- */

#define HIST_ARGS(F) \
    F(int64_t, n) F(int64_t, piece) \
    F(int32_t, T) \
    F(const void *, b) F(int32_t, b_dt) \
    F(const void *const *, xs) \
    F(const int32_t *, x_dt) \
    /* [T] -1: the hi pass (top 16 bits); -2: the windows' pass (below); else the lo pass of that top bin */ \
    F(const int32_t *, top) \
    /* [T] the histogram (all threads add to it) of each series: 2^15 (hi) or 2^16 (lo); NULL each for top -2 */ \
    F(int64_t *const *, hist) \
    /* the windows' pass: [T][5] two runs of bins per series, (first bin, bins) each, and a hot key (-1: none); \
     * this thread's counts of the low 16 bits of the runs' members but the hot key, [T] tables of \
     * [bins0 + bins1][2^16], and of the elements above each run and equal to the hot key, [T][3] */ \
    F(const int32_t *, win) F(uint32_t *const *, low) F(int64_t *, above)
typedef struct { HIST_ARGS(DECLARE) } hist_args;

/* Counts go to SUB separate tables (element j to table j % SUB): deltas crowd into a few bins, and one
 * counter bumped over and over waits on its own last store (0.78 against 1.16 ns an increment). */
#define SUB 4

/* the windows' pass over n elements (whole vectors, `valid` of them entries) at k of the sources: per run
 * of bins, the elements above it (NaN included) and its members by their low 16 bits, in this thread's
 * counts (a member's table row: its bin - first0 in run 0, else bins0 + its bin - first1). The hot key is
 * counted apart, by vector compares: bf16 deltas crowd onto single values (one ulp of a weight, a power of
 * two: 16% of the bench fixture's elements), whose increments of one counter would each wait on the last. */
ALWAYS void count_windows(const src_t *b, src_t x, int64_t k, int64_t n, int64_t valid, const hist_args *a, int i,
                          const int dt, const int has_b) {
    __m256i ignored = _mm256_setzero_si256();
    const int32_t *w = a->win + 5 * i;
    uint32_t *low = a->low[i];
    /* signed compares: bins are below 2^16 */
    const __m256i f0 = _mm256_set1_epi32(w[0]), n0 = _mm256_set1_epi32(w[1]), f1 = _mm256_set1_epi32(w[2]),
                  n1 = _mm256_set1_epi32(w[3]), hot = _mm256_set1_epi32(w[4]), zero = _mm256_setzero_si256(),
                  mask = _mm256_set1_epi32(0xFFFF);
    int64_t above0 = 0, above1 = 0, hits = 0;
    for (int64_t j = 0; j < n; j += V) {
        __m256i bits = _mm256_castps_si256(vabs(delta8(x, b, k + j, &ignored, dt, has_b)));
        __m256i r0 = _mm256_sub_epi32(_mm256_srli_epi32(bits, 16), f0), r1 = _mm256_sub_epi32(_mm256_srli_epi32(bits, 16), f1);
        __m256i in0 = _mm256_andnot_si256(_mm256_cmpgt_epi32(zero, r0), _mm256_cmpgt_epi32(n0, r0));
        __m256i in1 = _mm256_andnot_si256(_mm256_cmpgt_epi32(zero, r1), _mm256_cmpgt_epi32(n1, r1));
        unsigned entries = valid - j < V ? (1u << (valid - j > 0 ? valid - j : 0)) - 1 : 0xFFu;   /* not padding */
        above0 += __builtin_popcount(entries & (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(
            _mm256_cmpgt_epi32(r0, _mm256_sub_epi32(n0, _mm256_set1_epi32(1))))));
        above1 += __builtin_popcount(entries & (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(
            _mm256_cmpgt_epi32(r1, _mm256_sub_epi32(n1, _mm256_set1_epi32(1))))));
        unsigned is_hot = entries & (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(bits, hot)));
        hits += __builtin_popcount(is_hot);
        unsigned members = entries & ~is_hot & (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_or_si256(in0, in1)));
        if (!members) continue;
        uint32_t at[V] __attribute__((aligned(32)));
        __m256i row = _mm256_blendv_epi8(_mm256_add_epi32(n0, r1), r0, in0);
        _mm256_store_si256((__m256i *)at, _mm256_or_si256(_mm256_slli_epi32(row, 16), _mm256_and_si256(bits, mask)));
        for (; members; members &= members - 1) low[at[__builtin_ctz(members)]]++;
    }
    a->above[3 * i] += above0;
    a->above[3 * i + 1] += above1;
    a->above[3 * i + 2] += hits;
}

/* the keys of |x_i - b| for n elements (whole vectors) at k of the sources: the top 16 bits (hi pass),
 * or, for the lo pass, the low 16 bits of the members of bin `top`, counted straight into h */
ALWAYS void count_keys(const src_t *b, src_t x, int64_t k, int64_t n, int64_t valid, int32_t top, uint32_t *h,
                       size_t bins, const hist_args *a, int i, const int dt, const int has_b) {
    __m256i ignored = _mm256_setzero_si256();
    if (top == -2) {
        count_windows(b, x, k, n, valid, a, i, dt, has_b);
        return;
    }
    if (top < 0) {
        uint32_t keys[BLOCK] __attribute__((aligned(32)));
        for (int64_t j = 0; j < n; j += V) {
            __m256 d = vabs(delta8(x, b, k + j, &ignored, dt, has_b));
            _mm256_store_si256((__m256i *)(keys + j), _mm256_srli_epi32(_mm256_castps_si256(d), 16));
        }
        int64_t j = 0;
        for (; j + SUB <= valid; j += SUB) {
            h[keys[j]]++;
            h[bins + keys[j + 1]]++;
            h[2 * bins + keys[j + 2]]++;
            h[3 * bins + keys[j + 3]]++;
        }
        for (; j < valid; j++) h[keys[j]]++;
        return;
    }
    const __m256i topv = _mm256_set1_epi32(top);
    for (int64_t j = 0; j < n; j += V) {
        __m256i bits = _mm256_castps_si256(vabs(delta8(x, b, k + j, &ignored, dt, has_b)));
        unsigned members = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(
            _mm256_cmpeq_epi32(_mm256_srli_epi32(bits, 16), topv)));
        if (!members) continue;                                     /* most vectors hold none */
        uint32_t lanes[V] __attribute__((aligned(32)));
        _mm256_store_si256((__m256i *)lanes, bits);
        for (; members; members &= members - 1) {
            int lane = __builtin_ctz(members);
            if (j + lane < valid) h[lanes[lane] & 0xFFFFu]++;
        }
    }
}

#define COUNT_KEYS(dt) (has_b ? count_keys(b, x, k, n, valid, top, h, bins, a, i, dt, 1) \
                              : count_keys(b, x, k, n, valid, top, h, bins, a, i, dt, 0))

static void count_run(const src_t *b, src_t x, int64_t k, int64_t n, int64_t valid, int32_t top, uint32_t *h,
                      size_t bins, const hist_args *a, int i) {
    int has_b = b != NULL, dt = has_b && b->dt != x.dt ? MIXED : x.dt;
    dt == F32 ? COUNT_KEYS(F32) : dt == BF16 ? COUNT_KEYS(BF16) : dt == F16 ? COUNT_KEYS(F16) : COUNT_KEYS(MIXED);
}

static void histogram_piece(const void *args, void *own, int64_t first, int64_t stop) {
    const hist_args *a = args;
    src_t b = {a->b, a->b_dt};
    float bt[V] __attribute__((aligned(32))), xt[V] __attribute__((aligned(32)));
    for (int64_t s = first; s < stop; s += BLOCK) {
        int64_t n = stop - s < BLOCK ? stop - s : BLOCK, full = n / V * V;
        uint32_t *h = own;                                          /* this thread's counts */
        for (int i = 0; i < a->T; i++) {
            size_t bins = a->top[i] < 0 ? 1u << 15 : 1u << 16;
            src_t x = {a->xs[i], a->x_dt[i]};
            count_run(a->b ? &b : NULL, x, s, full, full, a->top[i], h, bins, a, i);
            if (full < n) {                                         /* the last few, through padded copies */
                if (a->b) load_block(bt, a->b, a->b_dt, s + full, n - full);
                load_block(xt, a->xs[i], a->x_dt[i], s + full, n - full);
                src_t tb = {bt, F32}, tx = {xt, F32};
                count_run(a->b ? &tb : NULL, tx, 0, V, n - full, a->top[i], h, bins, a, i);
            }
            h += a->top[i] == -2 ? 0 : a->top[i] < 0 ? SUB * bins : bins;
        }
    }
}

void histogram(const hist_args *a, int64_t *next) {
    size_t total = 1;
    for (int i = 0; i < a->T; i++) total += a->top[i] == -2 ? 0 : a->top[i] < 0 ? SUB << 15 : 1u << 16;
    uint32_t *counts = calloc(total, sizeof(uint32_t));          /* this call's: under 2^32 per bin */
    if (!counts) return;
    take_pieces(next, a->piece, a->n, histogram_piece, a, counts);
    const uint32_t *h = counts;
    for (int i = 0; i < a->T; i++) {
        if (a->top[i] == -2) continue;
        size_t bins = a->top[i] < 0 ? 1u << 15 : 1u << 16;
        for (size_t key = 0; key < bins; key++) {
            int64_t c = h[key];
            if (a->top[i] < 0) c += (int64_t)h[bins + key] + h[2 * bins + key] + h[3 * bins + key];
            if (c) __atomic_fetch_add(&a->hist[i][key], c, __ATOMIC_RELAXED);   /* shared by the threads */
        }
        h += a->top[i] < 0 ? SUB * bins : bins;
    }
    free(counts);
}

/* Entries with |x - b| == t among n elements (whole vectors) at k of the sources, after `count` of
 * them before: the new count, or, with k > 0 and the k-th among them, minus the position just after
 * it (a negative answer stops the caller). */
ALWAYS int64_t tie_run(const src_t *b, src_t x, int64_t at, int64_t n, int64_t valid, float t, int64_t count,
                       int64_t k, const int dt, const int has_b) {
    __m256i ignored = _mm256_setzero_si256();
    const __m256 tv = _mm256_set1_ps(t);
    for (int64_t j = 0; j < n; j += V) {
        unsigned eq = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(vabs(delta8(x, b, at + j, &ignored, dt, has_b)), tv,
                                                                 _CMP_EQ_OQ));
        if (valid - j < V) eq &= (1u << (valid - j)) - 1;           /* padding is not an entry */
        int c = __builtin_popcount(eq);
        if (k > 0 && count + c >= k) {
            for (int64_t r = k - count; --r > 0;) eq &= eq - 1;     /* the k-th: the r-th set bit */
            return -(j + __builtin_ctz(eq) + 1);
        }
        count += c;
    }
    return count;
}

#define TIE_RUN(dt) \
    (has_b ? tie_run(b, x, at, n, valid, t, count, k, dt, 1) : tie_run(b, x, at, n, valid, t, count, k, dt, 0))

static int64_t tie_dispatch(const src_t *b, src_t x, int64_t at, int64_t n, int64_t valid, float t, int64_t count,
                            int64_t k) {
    int has_b = b != NULL, dt = has_b && b->dt != x.dt ? MIXED : x.dt;
    return dt == F32 ? TIE_RUN(F32) : dt == BF16 ? TIE_RUN(BF16) : dt == F16 ? TIE_RUN(F16) : TIE_RUN(MIXED);
}

/* Entries of a series with |x - b| == t in [start, stop): their count, or, with k > 0, the
 * position just after the k-th of them (-1 if there are fewer). */
int64_t ties(const void *b, int32_t b_dt, const void *x, int32_t x_dt, float t, int64_t start, int64_t stop,
             int64_t k) {
    src_t sb = {b, b_dt}, sx = {x, x_dt};
    int64_t full = start + (stop - start) / V * V, count = 0;
    count = tie_dispatch(b ? &sb : NULL, sx, start, full - start, full - start, t, count, k);
    if (count < 0) return start - count;
    if (full < stop) {                                              /* the last few, through padded copies */
        float bt[V] __attribute__((aligned(32))) = {0}, xt[V] __attribute__((aligned(32))) = {0};
        if (b) load_block(bt, b, b_dt, full, stop - full);
        load_block(xt, x, x_dt, full, stop - full);
        src_t tb = {bt, F32}, tx = {xt, F32};
        count = tie_dispatch(b ? &tb : NULL, tx, 0, V, stop - full, t, count, k);
        if (count < 0) return full - count;
    }
    return k > 0 ? -1 : count;
}

/* ---- DARE's uniforms alone (kernels/dare.py uniform_ref), for the methods the fused merge does not cover ---- */

#define UNIFORM_ARGS(F) F(uint64_t, seed) F(int64_t, start) F(int64_t, n) F(int64_t, piece) F(float *, out)
typedef struct { UNIFORM_ARGS(DECLARE) } uniform_args;

static void uniform_piece(const void *args, void *own, int64_t first, int64_t stop) {
    const uniform_args *a = args;
    float u[BLOCK + 16] __attribute__((aligned(64)));
    for (int64_t j = first; j < stop; j += BLOCK) {
        int64_t n = stop - j < BLOCK ? stop - j : BLOCK;
        philox_fill(a->seed, (uint64_t)(a->start + j), n, u);
        memcpy(a->out + j, u, (size_t)n * sizeof(float));
    }
}

void uniforms(const uniform_args *a, int64_t *next) {
    take_pieces(next, a->piece, a->n, uniform_piece, a, NULL);
}

/* ---- FP8 values widened and scaled (engine/inputs/dequantize.py block_rows): element i of a chunk of whole rows
 * of `cols` is table[q[i]] * scales[row * scols + column / group], the one float32 product torch takes ---- */

#define WIDEN_ARGS(F) F(int64_t, n) F(int64_t, piece) F(int64_t, cols) F(int64_t, group) F(int64_t, scols) \
    F(const uint8_t *, q) F(const float *, table) F(const float *, scales) F(float *, out)
typedef struct { WIDEN_ARGS(DECLARE) } widen_args;

static void widen_piece(const void *args, void *own, int64_t first, int64_t stop) {
    const widen_args *a = args;
    for (int64_t i = first; i < stop;) {               /* a run of one scale: up to the group's or the piece's end */
        int64_t row = i / a->cols, col = i - row * a->cols;
        int64_t end = i + (a->group - col % a->group);
        if (end > stop) end = stop;
        const float s = a->scales[row * a->scols + col / a->group];
        const __m256 vs = _mm256_set1_ps(s);
        for (; i + V <= end; i += V) {
            __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(a->q + i)));
            _mm256_storeu_ps(a->out + i, _mm256_mul_ps(_mm256_i32gather_ps(a->table, idx, 4), vs));
        }
        for (; i < end; i++) a->out[i] = a->table[a->q[i]] * s;
    }
}

void widen_fp8(const widen_args *a, int64_t *next) {
    take_pieces(next, a->piece, a->n, widen_piece, a, NULL);
}

/* ---- model_stock and slerp: the products behind their cosines, and model_stock's interpolation ---- */

#define PRODUCT_ARGS(F) \
    F(int64_t, n) F(int64_t, granule) F(int64_t, piece) /* piece: granules a thread takes at a time */ \
    F(int32_t, T) \
    /* subtracted from every input (model_stock's deltas), or NULL (slerp) */ \
    F(const void *, b) F(int32_t, b_dt) \
    F(const void *const *, xs) \
    F(const int32_t *, x_dt) \
    F(int32_t, P) \
    F(const int32_t *, pi) F(const int32_t *, pj) /* [P] the pairs (i, j) */ \
    F(double *, sums)                    /* [P][granules] */
typedef struct { PRODUCT_ARGS(DECLARE) } product_args;

/* granule g: per pair, the products d_i d_j in float32, widened and folded (fold_sums' order) */
static void product_granule(const product_args *a, int64_t g, int64_t width, int64_t room, double *scratch,
                            float *ds, float *bs) {
    const int64_t G = a->granule, start = g * G, len = a->n - start < G ? a->n - start : G;
    const int64_t granules = (a->n + G - 1) / G, written = (len + V - 1) / V * V;
    for (int k = 0; k < a->P; k++)
        memset(scratch + k * room + written, 0, (size_t)(room - written) * sizeof(double));
    for (int64_t s = 0; s < len; s += BLOCK) {
        int64_t n = len - s < BLOCK ? len - s : BLOCK;
        if (a->b) load_block(bs, a->b, a->b_dt, start + s, n);
        for (int i = 0; i < a->T; i++) {                            /* zeros past n: products 0 there */
            float *d = ds + (int64_t)i * BLOCK;
            load_block(d, a->xs[i], a->x_dt[i], start + s, n);
            if (a->b)
                for (int64_t j = 0; j < n; j += V)
                    _mm256_store_ps(d + j, _mm256_sub_ps(_mm256_load_ps(d + j), _mm256_load_ps(bs + j)));
        }
        for (int k = 0; k < a->P; k++) {
            const float *di = ds + (int64_t)a->pi[k] * BLOCK, *dj = ds + (int64_t)a->pj[k] * BLOCK;
            for (int64_t j = 0; j < n; j += V)
                store_pd(scratch + k * room + s + j, _mm256_mul_ps(_mm256_load_ps(di + j), _mm256_load_ps(dj + j)));
        }
    }
    for (int k = 0; k < a->P; k++) a->sums[k * granules + g] = fold(scratch + k * room, width);
}

typedef struct {
    double *sums;                    /* [P][room] */
    float *ds;                       /* [T][BLOCK] */
} product_scratch;

static void product_piece(const void *args, void *own, int64_t first, int64_t stop) {
    const product_args *a = args;
    const product_scratch *scratch = own;
    const int64_t width = fold_width(a->granule), room = width > V ? width : V;
    float bs[BLOCK] __attribute__((aligned(32)));
    for (int64_t g = first; g < stop; g++) product_granule(a, g, width, room, scratch->sums, scratch->ds, bs);
}

/* Sum granules until none is left; the granules this thread summed (none without scratch). */
int64_t product_sums(const product_args *a, int64_t *next) {
    const int64_t width = fold_width(a->granule), room = width > V ? width : V;
    product_scratch scratch = {aligned_alloc(32, (size_t)(a->P * room) * sizeof(double)),
                               aligned_alloc(32, (size_t)a->T * BLOCK * sizeof(float))};
    int64_t done = 0;
    if (scratch.sums && scratch.ds)
        done = take_pieces(next, a->piece, (a->n + a->granule - 1) / a->granule, product_piece, a, &scratch);
    free(scratch.sums);
    free(scratch.ds);
    return done;
}

#define MIX_ARGS(F) \
    /* row: elements that share one (t, u); pieces are whole rows or blocks of one */ \
    F(int64_t, n) F(int64_t, row) F(int64_t, piece) \
    F(int32_t, T) \
    F(const void *, b) F(int32_t, b_dt) \
    F(const void *const *, xs) \
    F(const int32_t *, x_dt) \
    F(const float *, t) F(const float *, u) /* [rows of the chunk] */ \
    F(void *, out) F(int32_t, out_dt) \
    F(int64_t *, bad)                    /* [2 + T] as merge_args.bad */
typedef struct { MIX_ARGS(DECLARE) } mix_args;

/* out = t * ((0 + x_1 + ... + x_T) / T) + u * b for n elements of one row (interpolation.apply_model_stock) */
static void mix_block(const mix_args *a, int64_t start, int64_t n, float t, float u, float *xs, float *bs) {
    const __m256 tv = _mm256_set1_ps(t), uv = _mm256_set1_ps(u), count = _mm256_set1_ps((float)a->T);
    float y[BLOCK] __attribute__((aligned(32)));
    __m256i bad_b = _mm256_setzero_si256();
    for (int64_t j = 0; j < n; j += V) _mm256_store_ps(y + j, _mm256_setzero_ps());
    for (int i = 0; i < a->T; i++) {
        __m256i bad = _mm256_setzero_si256();
        load_block(xs, a->xs[i], a->x_dt[i], start, n);
        for (int64_t j = 0; j < n; j += V) {
            __m256 x = _mm256_load_ps(xs + j);
            bad = _mm256_or_si256(bad, not_finite(x));
            _mm256_store_ps(y + j, _mm256_add_ps(_mm256_load_ps(y + j), x));
        }
        a->bad[2 + i] += any(bad);
    }
    load_block(bs, a->b, a->b_dt, start, n);
    for (int64_t j = 0; j < n; j += V) {
        __m256 b = _mm256_load_ps(bs + j);
        bad_b = _mm256_or_si256(bad_b, not_finite(b));
        __m256 mean = _mm256_div_ps(_mm256_load_ps(y + j), count);
        _mm256_store_ps(y + j, _mm256_add_ps(_mm256_mul_ps(tv, mean), _mm256_mul_ps(uv, b)));
    }
    a->bad[1] += any(bad_b);
    store_block(a->out, a->out_dt, start, y, n);
    load_block(y, a->out, a->out_dt, start, n);                     /* as stored: the cast may overflow */
    __m256i bad_out = _mm256_setzero_si256();
    for (int64_t j = 0; j < n; j += V) bad_out = _mm256_or_si256(bad_out, not_finite(_mm256_load_ps(y + j)));
    a->bad[0] += any(bad_out);
}

static void mix_piece(const void *args, void *own, int64_t first, int64_t stop) {
    const mix_args *a = args;
    float xs[BLOCK] __attribute__((aligned(32))), bs[BLOCK] __attribute__((aligned(32)));
    for (int64_t s = first; s < stop;) {                            /* blocks never straddle two rows */
        int64_t row = s / a->row, end = (row + 1) * a->row < stop ? (row + 1) * a->row : stop;
        int64_t n = end - s < BLOCK ? end - s : BLOCK;
        mix_block(a, s, n, a->t[row], a->u[row], xs, bs);
        s += n;
    }
}

void mix(const mix_args *a, int64_t *next) {
    take_pieces(next, a->piece, a->n, mix_piece, a, NULL);
}

/* ---- the argument structs as compiled, for tests/test_kernels_cpu.py to hold kernels/cpu.py's ctypes
 * mirrors to ---- */

/* i, u: a signed, unsigned integer; f: a float; p: a pointer (type class 5 in GCC and clang); ?: other */
#define KIND(x) (__builtin_classify_type(x) == 5 ? 'p' : _Generic((x), int32_t: 'i', int64_t: 'i', uint64_t: 'u', \
                                                                 float: 'f', double: 'f', default: '?'))
#define ROW(type, name) {NAME(S), #name, offsetof(S, name), sizeof(((S *)0)->name), KIND(((S *)0)->name)},
#define NAME(s) NAME_(s)
#define NAME_(s) #s

static const struct { const char *type, *field; int64_t offset, size; char kind; } LAYOUT[] = {
#define S merge_args
    {NAME(S), "", 0, sizeof(S), 's'}, MERGE_ARGS(ROW)
#undef S
#define S hist_args
    {NAME(S), "", 0, sizeof(S), 's'}, HIST_ARGS(ROW)
#undef S
#define S uniform_args
    {NAME(S), "", 0, sizeof(S), 's'}, UNIFORM_ARGS(ROW)
#undef S
#define S widen_args
    {NAME(S), "", 0, sizeof(S), 's'}, WIDEN_ARGS(ROW)
#undef S
#define S rate_args
    {NAME(S), "", 0, sizeof(S), 's'}, RATE_ARGS(ROW)
#undef S
#define S fold_args
    {NAME(S), "", 0, sizeof(S), 's'}, FOLD_ARGS(ROW)
#undef S
#define S product_args
    {NAME(S), "", 0, sizeof(S), 's'}, PRODUCT_ARGS(ROW)
#undef S
#define S mix_args
    {NAME(S), "", 0, sizeof(S), 's'}, MIX_ARGS(ROW)
#undef S
};

/* Row k of the layout: a struct's name, then "", 0, its size and 's'; or the struct's name, a field's name,
 * offset, size and kind (KIND), in declaration order. 0 past the last row, else 1. */
int32_t arg_layout(int32_t k, const char **type, const char **field, int64_t *offset, int64_t *size, char *kind) {
    if (k < 0 || k >= (int32_t)(sizeof(LAYOUT) / sizeof(LAYOUT[0]))) return 0;
    *type = LAYOUT[k].type;
    *field = LAYOUT[k].field;
    *offset = LAYOUT[k].offset;
    *size = LAYOUT[k].size;
    *kind = LAYOUT[k].kind;
    return 1;
}
