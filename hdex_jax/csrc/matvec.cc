// The matrix products of decode and short prompts on the CPU: y[b, M, N] = x[b, M, K] @ W[b] for a few rows M
// (the projections: one product of M = batch rows x tokens; attention at decode: one per KV head, M = its query
// heads).
//
// XLA CPU runs these products through Eigen's contraction, which reads SmolLM2's layer weights at 15-21 GB/s
// where a plain stream reaches about 30 (docs/performance.md, "The matrix-vector kernel"). Here one row streams
// the weight once, in contiguous pieces, one per core; several rows use register tiles over blocks of the
// weight small enough to stay in L2 while every row passes over them. Sums are float32, with fused
// multiply-adds where the CPU has them. It is an XLA FFI handler: `hdex_jax/kernel_build.py` builds and
// registers it, `hdex_jax/matvec.py` calls it.
//
// W[b] is either [K, N] (`transposed` false: the projections, stored [in, out]; attention's values [S, hd]) or
// [N, K] (`transposed` true: a tied LM head contracting the embedding [V, E] on E; attention's keys [S, hd]).
// Several products are split between the pieces whole; a single one over K for [K, N] (each piece writes
// partial sums, added at the end) and over N for [N, K] (each writes its own outputs). The pieces run on the
// calling thread and on helper threads of this library, which stay awake between the products of a step.
//
// W is read in the format it is stored in, since decode's time is the bytes it reads: float32, float16, bfloat16,
// or one of hdex_jax/quant.py's quantized formats (int8 values with a float16 scale per group of 32 inputs or per
// output: q8_0, int8; 4-bit values with a scale and a zero of 8, q4_0, or a scale and an offset, q4_1 and int4),
// laid out as quant.py's module docstring says. Each register of weights is converted to float32 as it is loaded
// and multiplied there; x and y are float32.

#if defined(__linux__)
#include <sched.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// [batch, rows, columns]: one product per batch element.
using Batch = ffi::Buffer<ffi::F32, 3>;

namespace {

// One function body, compiled for x86-64-v4 (AVX-512), x86-64-v3 (AVX2 and FMA) and baseline x86-64; the loader
// picks the best the CPU has. Loops written for the compiler's vectorizer.
#if defined(__x86_64__)
#define HDEX_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HDEX_CLONES
#endif

// y[N] = x[k0:k1] @ w[k0:k1, N] for one row x, with w row-major [K, N]: a stream over the weight. Four rows of w
// per pass over y, so y (in L1) is loaded and stored once per four rows of the weight.
HDEX_CLONES void stream_kn(const float* x, const float* w, float* y, int64_t N, int64_t k0, int64_t k1) {
  std::memset(y, 0, sizeof(float) * N);
  int64_t k = k0;
  for (; k + 4 <= k1; k += 4) {
    const float *r0 = w + k * N, *r1 = r0 + N, *r2 = r1 + N, *r3 = r2 + N;
    const float a0 = x[k], a1 = x[k + 1], a2 = x[k + 2], a3 = x[k + 3];
    float* __restrict out = y;
    for (int64_t n = 0; n < N; ++n) out[n] += a0 * r0[n] + a1 * r1[n] + a2 * r2[n] + a3 * r3[n];
  }
  for (; k < k1; ++k) {
    const float* r = w + k * N;
    const float a = x[k];
    float* __restrict out = y;
    for (int64_t n = 0; n < N; ++n) out[n] += a * r[n];
  }
}

// W floats: one register of the instruction set a register tile is compiled for (generic vectors wider than the
// registers are split through memory, many times slower).
template <int W>
struct Lanes;
template <>
struct Lanes<16> { typedef float type __attribute__((vector_size(64), aligned(4))); };
template <>
struct Lanes<8> { typedef float type __attribute__((vector_size(32), aligned(4))); };
template <>
struct Lanes<4> { typedef float type __attribute__((vector_size(16), aligned(4))); };

template <int W>
__attribute__((always_inline)) inline typename Lanes<W>::type load(const float* p) {
  typename Lanes<W>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <int W>
__attribute__((always_inline)) inline void store(float* p, typename Lanes<W>::type v) {
  std::memcpy(p, &v, sizeof(v));
}

inline float half(uint16_t h) {
  _Float16 f;
  std::memcpy(&f, &h, sizeof(f));
  return f;
}

inline float bhalf(uint16_t h) {
  const uint32_t bits = uint32_t{h} << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// float16 -> float32 of a register: F16C's vcvtph2ps in x86-64-v3 and v4. These are not always_inline: GCC
// inlines a function with a target only into one of the same target, which the per-target entries below are
// (`flatten` inlines everything they call into them).
#if defined(__x86_64__)
__attribute__((target("arch=x86-64-v4"))) inline Lanes<16>::type widen_half(const uint16_t* p, Lanes<16>::type) {
  return (Lanes<16>::type)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

__attribute__((target("arch=x86-64-v3"))) inline Lanes<8>::type widen_half(const uint16_t* p, Lanes<8>::type) {
  return (Lanes<8>::type)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
#endif

inline Lanes<4>::type widen_half(const uint16_t* p, Lanes<4>::type) {
  Lanes<4>::type v;
  for (int i = 0; i < 4; ++i) v[i] = half(p[i]);
  return v;
}

// W int32s: the integers of a register of weights.
template <int W>
struct Ints;
template <>
struct Ints<16> { typedef int32_t type __attribute__((vector_size(64))); };
template <>
struct Ints<8> { typedef int32_t type __attribute__((vector_size(32))); };
template <>
struct Ints<4> { typedef int32_t type __attribute__((vector_size(16))); };

// W bytes (signed or not) -> W int32s: vpmovsxbd or vpmovzxbd where the instruction set has them (GCC 12 turns a
// generic vector conversion from bytes into one insertion per byte).
#if defined(__x86_64__)
__attribute__((target("arch=x86-64-v4"))) inline Ints<16>::type widen_bytes(const int8_t* p, Ints<16>::type) {
  return (Ints<16>::type)_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

__attribute__((target("arch=x86-64-v4"))) inline Ints<16>::type widen_bytes(const uint8_t* p, Ints<16>::type) {
  return (Ints<16>::type)_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

__attribute__((target("arch=x86-64-v3"))) inline Ints<8>::type widen_bytes(const int8_t* p, Ints<8>::type) {
  return (Ints<8>::type)_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

__attribute__((target("arch=x86-64-v3"))) inline Ints<8>::type widen_bytes(const uint8_t* p, Ints<8>::type) {
  return (Ints<8>::type)_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
#endif

// table[q & 15] for each lane's q: AVX-512's vpermps, which reads only the low 4 bits of each index. In an [N, K]
// 4-bit weight a register's 16 weights share one scale and offset, so their 16 possible values are one register.
#if defined(__x86_64__)
__attribute__((target("arch=x86-64-v4"))) inline Lanes<16>::type lookup(Lanes<16>::type table, Ints<16>::type q) {
  return (Lanes<16>::type)_mm512_permutexvar_ps((__m512i)q, (__m512)table);
}
#endif

template <typename Byte>
inline Ints<4>::type widen_bytes(const Byte* p, Ints<4>::type) {
  Ints<4>::type v;
  for (int i = 0; i < 4; ++i) v[i] = p[i];
  return v;
}

// The formats a weight is read in (hdex_jax/quant.py's module docstring is the layout): the type of a stored
// element, bits per weight, whether groups of inputs share a float16 scale (and an offset), the integer's zero.
template <typename Stored, int Bits, bool Scaled, bool Affine, int Zero>
struct Storage {
  typedef Stored T;
  static constexpr int kBits = Bits, kZero = Zero;
  static constexpr bool kScaled = Scaled, kAffine = Affine;
};
struct F32 : Storage<float, 32, false, false, 0> {};
struct F16 : Storage<uint16_t, 16, false, false, 0> {};
struct BF16 : Storage<uint16_t, 16, false, false, 0> {};
struct Int8 : Storage<int8_t, 8, true, false, 0> {};  // q8_0 (a scale per 32 inputs), int8 (one per output): d * q
struct Q4_0 : Storage<uint8_t, 4, true, false, 8> {};  // d * (q - 8)
struct Q4_1 : Storage<uint8_t, 4, true, true, 0> {};   // q4_1 and int4: d * q + m

enum class Format { kF32, kF16, kBF16, kInt8, kQ4_0, kQ4_1 };

struct Weight {
  Format format;
  const void* values;      // [K, N] or [N, K] elements; 4-bit formats: [K / 2, N] or [N, K / 2] bytes
  const uint16_t* scale;   // float16 [K / group, N] or [N, K / group]; the scaled formats only
  const uint16_t* offset;  // float16, as `scale`; q4_1 only
  bool per_output;         // one scale per output (int8), else one per kGroup inputs
};

// Inputs per scale of the grouped formats, and rows of w per block of `blocked` (a block is one group).
constexpr int64_t kGroup = 32;

// Where input k of a row is stored: 4-bit formats keep inputs j and j + 16 of each group of 32 in the low and
// high nibble of byte j (GGUF's order).
template <typename F>
inline int64_t packed(int64_t k) {
  return F::kBits == 4 ? k / kGroup * (kGroup / 2) + k % (kGroup / 2) : k;
}

template <typename F>
inline bool high(int64_t k) {
  return F::kBits == 4 && k % kGroup >= kGroup / 2;
}

// The group of input k: its row of scales in [K / group, N], its column in [N, K / group] (a shift, not a
// division: products call this in their inner loops).
inline int64_t group_of(const Weight& w, int64_t k) {
  return w.per_output ? 0 : k / kGroup;
}

template <typename F>
inline int64_t stored(int64_t K) {
  return F::kBits == 4 ? K / 2 : K;
}

// The weight from its stored integer q (as a float) and its group's scale and offset. d * q is exact in float32
// (11 by at most 8 significant bits), so the fused multiply-add of q4_1 rounds d * q + m once, as quant.py's
// float32 product then sum does: the same bits. A zero (q4_0's 8) enters as the offset -8 * d (exact, a power of
// two): d * q - 8 * d is exactly d * (q - 8), which float32 holds, so one multiply-add gives quant.py's bits
// without an integer subtraction per weight.
template <typename F, typename T>
__attribute__((always_inline)) inline T dequantize(T q, T scale, T offset) {
  if constexpr (F::kAffine || F::kZero != 0) return scale * q + offset;
  else if constexpr (F::kScaled) return scale * q;
  else return q;
}

// The offset `dequantize` takes for a group of scale `scale`: stored (q4_1, int4), or the zero's (q4_0).
template <typename F, typename T>
__attribute__((always_inline)) inline T offset_of(T scale, T stored) {
  if constexpr (F::kAffine) return stored;
  else return scale * -static_cast<float>(F::kZero);
}

// One stored integer (or float) as a float, before its scale.
template <typename F>
inline float value(const typename F::T* p, bool hi) {
  if constexpr (std::is_same_v<F, F16>) return half(*p);
  else if constexpr (std::is_same_v<F, BF16>) return bhalf(*p);
  else if constexpr (F::kBits == 4) return static_cast<float>(hi ? *p >> 4 : *p & 15);
  else return static_cast<float>(*p);
}

// W stored values from p on as floats, before their scale (4-bit formats: the low or the high nibbles).
template <typename F, int W>
__attribute__((always_inline)) inline typename Lanes<W>::type values(const typename F::T* p, bool hi) {
  typedef typename Lanes<W>::type Vec;
  if constexpr (std::is_same_v<F, F32>) {
    return load<W>(p);
  } else if constexpr (std::is_same_v<F, F16>) {
    return widen_half(p, Vec{});
  } else if constexpr (std::is_same_v<F, BF16>) {
    typedef typename Ints<W>::type Int;
    typedef uint16_t Halves __attribute__((vector_size(2 * W)));
    Halves h;
    std::memcpy(&h, p, sizeof(h));
    const Int bits = __builtin_convertvector(h, Int) << 16;  // a bfloat16 is the high half of a float32
    Vec v;
    std::memcpy(&v, &bits, sizeof(v));
    return v;
  } else {
    typename Ints<W>::type i = widen_bytes(p, typename Ints<W>::type{});
    if constexpr (F::kBits == 4) i = hi ? i >> 4 : i & 15;
    return __builtin_convertvector(i, Vec);
  }
}

// The weight at stored element `at`, whose scale and offset are element `group` of theirs.
template <typename F>
inline float weight(const Weight& w, int64_t at, bool hi, int64_t group) {
  const float q = value<F>(static_cast<const typename F::T*>(w.values) + at, hi);
  const float scale = F::kScaled ? half(w.scale[group]) : 0.f;
  const float offset = offset_of<F>(scale, F::kAffine ? half(w.offset[group]) : 0.f);
  return dequantize<F>(q, scale, offset);
}

// y[N] = x[k0:k1] @ w[k0:k1, N] for one row x, with w [K, N] and k0 a multiple of 4 (of kGroup in the grouped
// formats): a stream over the weight. Several inputs per pass over y, so y (in L1) is loaded and stored once per
// several rows of the weight: four, or eight in 4-bit formats (inputs j to j + 3 and j + 16 to j + 19 of a group,
// four rows of bytes, each widened once for its two nibbles).
template <typename F, int W>
__attribute__((always_inline)) inline void stream(const float* x, const Weight& w, float* y, int64_t N, int64_t k0,
                                                  int64_t k1) {
  typedef typename Lanes<W>::type Vec;
  const auto* stored_w = static_cast<const typename F::T*>(w.values);
  const int64_t tiled = N / W * W;
  // The scaled formats' scales and offsets of the current group as float32, converted once per group (once for
  // int8's per-output scales) rather than in every pass: each pass then only loads them. One buffer per thread,
  // grown to the widest weight seen, so a decode step allocates nothing.
  static thread_local std::vector<float> factors;
  if (F::kScaled && factors.size() < static_cast<size_t>(2 * tiled)) factors.resize(2 * tiled);
  float* const scales = factors.data();
  float* const offsets = scales + tiled;
  auto convert = [&](int64_t group) {
    for (int64_t n = 0; n < tiled; n += W) {
      const Vec scale = widen_half(w.scale + group * N + n, Vec{});
      store<W>(scales + n, scale);
      const Vec stored = F::kAffine ? widen_half(w.offset + group * N + n, Vec{}) : Vec{};
      store<W>(offsets + n, offset_of<F>(scale, stored));
    }
  };
  // One pass: inputs k[i] stored in rows row[i] (high nibbles where hi[i]), all of one group.
  auto pass = [&](const auto& k, const auto& row, const auto& hi) {
    constexpr int P = sizeof(k) / sizeof(k[0]);
    float a[P];
    for (int i = 0; i < P; ++i) a[i] = x[k[i]];
    for (int64_t n = 0; n < tiled; n += W) {
      Vec scale = {}, offset = {};
      if constexpr (F::kScaled) scale = load<W>(scales + n), offset = load<W>(offsets + n);
      Vec acc = load<W>(y + n);
      // The next pass's rows (the four after this pass's), fetched while this one computes: the quantized formats'
      // loops are bound by their arithmetic, and the hardware prefetcher alone left them waiting on memory (one
      // core read q4_1 at 4.3 GB/s from memory and 11.6 from L2; with this, 8.2 from memory).
      if constexpr (F::kScaled)
        for (int i = 0; i < P; ++i)
          if (!hi[i]) __builtin_prefetch(stored_w + (row[i] + 4) * N + n);
      for (int i = 0; i < P; ++i)
        acc += a[i] * dequantize<F>(values<F, W>(stored_w + row[i] * N + n, hi[i]), scale, offset);
      store<W>(y + n, acc);
    }
    const int64_t group = group_of(w, k[0]) * N;
    for (int64_t n = tiled; n < N; ++n)
      for (int i = 0; i < P; ++i) y[n] += a[i] * weight<F>(w, row[i] * N + n, hi[i], group + n);
  };
  std::memset(y, 0, sizeof(float) * N);
  if constexpr (F::kBits == 4) {
    for (int64_t kb = k0; kb < k1; kb += kGroup) {
      convert(group_of(w, kb));
      const int64_t rb = packed<F>(kb);
      for (int64_t j = 0; j < kGroup / 2; j += 4) {
        const int64_t k[8] = {kb + j, kb + j + 1, kb + j + 2, kb + j + 3,
                              kb + j + 16, kb + j + 17, kb + j + 18, kb + j + 19};
        const int64_t row[8] = {rb + j, rb + j + 1, rb + j + 2, rb + j + 3, rb + j, rb + j + 1, rb + j + 2, rb + j + 3};
        const bool hi[8] = {false, false, false, false, true, true, true, true};
        pass(k, row, hi);
      }
    }
  } else {
    int64_t k = k0;
    for (; k + 4 <= k1; k += 4) {
      if (F::kScaled && (k == k0 || (!w.per_output && k % kGroup == 0))) convert(group_of(w, k));
      const int64_t ks[4] = {k, k + 1, k + 2, k + 3};
      const bool hi[4] = {false, false, false, false};
      pass(ks, ks, hi);
    }
    for (; k < k1; ++k) {
      const float a = x[k];
      for (int64_t n = 0; n < N; ++n) y[n] += a * weight<F>(w, k * N + n, false, group_of(w, k) * N + n);
    }
  }
}

// y[M, n0:n1] = x[M, K] @ w[n0:n1, K]^T, with w float32 row-major [N, K]: one dot product per output.
HDEX_CLONES void dots_nk(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N, int64_t n0,
                         int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* __restrict row = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* __restrict xm = x + m * K;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < K; ++k) acc += row[k] * xm[k];
      y[m * N + n] = acc;
    }
  }
}

// Rows of w per block: a block of [kBlockRows, N] stays in L2 while every group of rows of x passes over it, so
// the weight comes from memory once however many rows x has. One block is one group of the grouped formats.
constexpr int64_t kBlockRows = kGroup;
constexpr int kTileRows = 4;
static_assert(kTileRows == 4, "the remainder switches cover groups of 1 to 3 rows");

// y[R rows, V registers of columns at nb] += x[R rows, kb:ke] @ w[kb:ke, those columns], w [K, N]: R x V
// registers of sums, V of the weight's row (and V of scales and of offsets) and one of x's broadcast value,
// within the register file. In 4-bit formats rows kb + j and kb + j + 16 are taken together (one load of bytes).
template <typename F, int W, int V, int R>
__attribute__((always_inline)) inline void tile_kn(const float* x, int64_t K, const Weight& w, int64_t N, float* y,
                                                   int64_t kb, int64_t ke, int64_t nb) {
  typedef typename Lanes<W>::type Vec;
  const auto* stored_w = static_cast<const typename F::T*>(w.values);
  Vec acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = load<W>(y + r * N + nb + W * v);
  Vec scale[V] = {}, offset[V] = {};  // of the group the block is (blocks never straddle groups)
  for (int v = 0; v < V; ++v) {
    if constexpr (F::kScaled) scale[v] = widen_half(w.scale + group_of(w, kb) * N + nb + W * v, Vec{});
    if constexpr (F::kAffine) offset[v] = widen_half(w.offset + group_of(w, kb) * N + nb + W * v, Vec{});
    offset[v] = offset_of<F>(scale[v], offset[v]);
  }
  auto step = [&](int64_t k, int64_t row, bool hi) {  // input k, stored in row `row`
    Vec wv[V];
    for (int v = 0; v < V; ++v)
      wv[v] = dequantize<F>(values<F, W>(stored_w + row * N + nb + W * v, hi), scale[v], offset[v]);
    for (int r = 0; r < R; ++r) {
      const float a = x[r * K + k];
      for (int v = 0; v < V; ++v) acc[r][v] += a * wv[v];
    }
  };
  if constexpr (F::kBits == 4) {  // whole groups: K is a multiple of kGroup
    const int64_t row = packed<F>(kb);
    for (int64_t j = 0; j < kBlockRows / 2; ++j) {
      step(kb + j, row + j, false);
      step(kb + j + kBlockRows / 2, row + j, true);
    }
  } else {
    for (int64_t k = kb; k < ke; ++k) step(k, k, false);
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) store<W>(y + r * N + nb + W * v, acc[r][v]);
}

// y[M, N] = x[M, k0:k1] @ w[k0:k1, N] with w [K, N], k0 as for `stream`: register tiles of kTileRows rows x
// W * V columns over blocks of w that stay in L2.
template <typename F, int W, int V>
__attribute__((always_inline)) inline void blocked(const float* x, const Weight& w, float* y, int64_t M, int64_t K,
                                                   int64_t N, int64_t k0, int64_t k1) {
  constexpr int64_t tile = W * V;
  std::memset(y, 0, sizeof(float) * M * N);
  const int64_t tiled = N / tile * tile;
  for (int64_t kb = k0; kb < k1; kb += kBlockRows) {
    const int64_t ke = std::min(kb + kBlockRows, k1);
    for (int64_t nb = 0; nb < tiled; nb += tile) {
      // The next block's rows of these columns, fetched while every row of x passes over this block: the
      // quantized formats' tiles are bound by their arithmetic and left the hardware prefetcher behind.
      if constexpr (F::kScaled) {
        const auto* next = static_cast<const typename F::T*>(w.values) + packed<F>(kb + kBlockRows) * N + nb;
        for (int64_t r = 0; r < stored<F>(kBlockRows); ++r)
          for (int64_t c = 0; c < tile * static_cast<int64_t>(sizeof(typename F::T)); c += 64)
            __builtin_prefetch(reinterpret_cast<const char*>(next + r * N) + c);
      }
      int64_t m = 0;
      for (; m + kTileRows <= M; m += kTileRows)
        tile_kn<F, W, V, kTileRows>(x + m * K, K, w, N, y + m * N, kb, ke, nb);
      switch (M - m) {
        case 3: tile_kn<F, W, V, 3>(x + m * K, K, w, N, y + m * N, kb, ke, nb); break;
        case 2: tile_kn<F, W, V, 2>(x + m * K, K, w, N, y + m * N, kb, ke, nb); break;
        case 1: tile_kn<F, W, V, 1>(x + m * K, K, w, N, y + m * N, kb, ke, nb); break;
        default: break;
      }
    }
    for (int64_t m = 0; m < M; ++m) {  // the last N % tile columns
      for (int64_t k = kb; k < ke; ++k) {
        const float a = x[m * K + k];
        for (int64_t n = tiled; n < N; ++n)
          y[m * N + n] += a * weight<F>(w, packed<F>(k) * N + n, high<F>(k), group_of(w, k) * N + n);
      }
    }
  }
}

// y[R rows, n] = x[R rows, K] @ w[n, K] with w [N, K]: R dot products over one row of w, each register of it
// converted once for the R rows; one register of sums per register of a group, for independent additions.
template <typename F, int W, int R>
__attribute__((always_inline)) inline void tile_nk(const float* x, const Weight& w, float* y, int64_t K, int64_t N,
                                                   int64_t n) {
  typedef typename Lanes<W>::type Vec;
  constexpr int C = kGroup / W;
  const auto* row = static_cast<const typename F::T*>(w.values) + n * stored<F>(K);
  const int64_t groups = w.per_output ? 1 : K / kGroup;
  Vec acc[R][C] = {};
  int64_t k = 0;
  for (; k + kGroup <= K; k += kGroup) {
    Vec scale = {}, offset = {};
    if constexpr (F::kScaled) scale += half(w.scale[n * groups + group_of(w, k)]);
    if constexpr (F::kAffine) offset += half(w.offset[n * groups + group_of(w, k)]);
    offset = offset_of<F>(scale, offset);
    // The same inputs 4 rows of w on: bound by their arithmetic, these loops left the hardware prefetcher
    // behind (one core read q4_1's LM head at 2.8 GB/s from memory without, 5.4 with).
    if constexpr (F::kScaled) __builtin_prefetch(row + 4 * stored<F>(K) + packed<F>(k));
#if defined(__x86_64__)
    if constexpr (F::kBits == 4 && W == 16) {
      // The group's 16 values d * q + m, each rounded as `dequantize` rounds it, looked up by nibble: a lookup per
      // register of weights instead of a mask or shift, a conversion and a multiply-add.
      const Vec table = dequantize<F>(Vec{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, scale, offset);
      const auto bytes = widen_bytes(row + packed<F>(k), typename Ints<W>::type{});
      const Vec low = lookup(table, bytes), high = lookup(table, bytes >> 4);
      for (int r = 0; r < R; ++r) {
        acc[r][0] += load<W>(x + r * K + k) * low;
        acc[r][1] += load<W>(x + r * K + k + W) * high;
      }
      continue;
    }
#endif
    for (int c = 0; c < C; ++c) {
      const Vec wv = dequantize<F>(values<F, W>(row + packed<F>(k + c * W), c * W >= kGroup / 2), scale, offset);
      for (int r = 0; r < R; ++r) acc[r][c] += load<W>(x + r * K + k + c * W) * wv;
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 1; c < C; ++c) acc[r][0] += acc[r][c];
    float sum = 0.f;
    if constexpr (F::kScaled) {
      // Halves added pairwise, 4 dependent additions for 16 lanes instead of 16 (the float formats keep their
      // order, and so their bits).
      for (int h = W / 2; h >= 1; h /= 2)
        for (int i = 0; i < h; ++i) acc[r][0][i] += acc[r][0][i + h];
      sum = acc[r][0][0];
    } else {
      for (int i = 0; i < W; ++i) sum += acc[r][0][i];
    }
    for (int64_t t = k; t < K; ++t)  // the last K % kGroup inputs (float and int8 weights only)
      sum += x[r * K + t] * weight<F>(w, n * stored<F>(K) + packed<F>(t), high<F>(t), n * groups + group_of(w, t));
    y[r * N + n] = sum;
  }
}

// y[M, n0:n1] = x[M, K] @ w[n0:n1, K]^T with w [N, K]: tiles of kTileRows rows over each row of w.
template <typename F, int W>
__attribute__((always_inline)) inline void rows_nk(const float* x, const Weight& w, float* y, int64_t M, int64_t K,
                                                   int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    int64_t m = 0;
    for (; m + kTileRows <= M; m += kTileRows) tile_nk<F, W, kTileRows>(x + m * K, w, y + m * N, K, N, n);
    switch (M - m) {
      case 3: tile_nk<F, W, 3>(x + m * K, w, y + m * N, K, N, n); break;
      case 2: tile_nk<F, W, 2>(x + m * K, w, y + m * N, K, N, n); break;
      case 1: tile_nk<F, W, 1>(x + m * K, w, y + m * N, K, N, n); break;
      default: break;
    }
  }
}

template <typename F, int W, int V>
__attribute__((always_inline)) inline void rows_of(const Weight& w, bool transposed, const float* x, float* y,
                                                   int64_t M, int64_t K, int64_t N, int64_t lo, int64_t hi) {
  if constexpr (std::is_same_v<F, F32>) {
    blocked<F, W, V>(x, w, y, M, K, N, lo, hi);  // float32's one row and [N, K] products: stream_kn, dots_nk
  } else if (transposed) {
    rows_nk<F, W>(x, w, y, M, K, N, lo, hi);
  } else if (M == 1) {
    stream<F, W>(x, w, y, N, lo, hi);
  } else {
    blocked<F, W, V>(x, w, y, M, K, N, lo, hi);
  }
}

template <int W, int V>
__attribute__((always_inline)) inline void rows_in(const Weight& w, bool transposed, const float* x, float* y,
                                                   int64_t M, int64_t K, int64_t N, int64_t lo, int64_t hi) {
  switch (w.format) {
    case Format::kF32: return rows_of<F32, W, V>(w, transposed, x, y, M, K, N, lo, hi);
    case Format::kF16: return rows_of<F16, W, V>(w, transposed, x, y, M, K, N, lo, hi);
    case Format::kBF16: return rows_of<BF16, W, V>(w, transposed, x, y, M, K, N, lo, hi);
    case Format::kInt8: return rows_of<Int8, W, V>(w, transposed, x, y, M, K, N, lo, hi);
    case Format::kQ4_0: return rows_of<Q4_0, W, V>(w, transposed, x, y, M, K, N, lo, hi);
    case Format::kQ4_1: return rows_of<Q4_1, W, V>(w, transposed, x, y, M, K, N, lo, hi);
  }
}

// y[M, lo:hi] (transposed: outputs lo:hi; else the partial sums over inputs lo:hi) = x[M, K] @ w, in every format.
// One version per instruction set, each with the tile that fits its registers (AVX-512: 32 of 16 floats, 4 x 4
// tiles; AVX2: 16 of 8, 4 x 2; SSE: 16 of 4, 4 x 2); the loader picks the best the CPU has.
#if defined(__x86_64__)
__attribute__((target("arch=x86-64-v4"), flatten)) void rows(const Weight& w, bool transposed, const float* x,
                                                             float* y, int64_t M, int64_t K, int64_t N, int64_t lo,
                                                             int64_t hi) {
  rows_in<16, 4>(w, transposed, x, y, M, K, N, lo, hi);
}

__attribute__((target("arch=x86-64-v3"), flatten)) void rows(const Weight& w, bool transposed, const float* x,
                                                             float* y, int64_t M, int64_t K, int64_t N, int64_t lo,
                                                             int64_t hi) {
  rows_in<8, 2>(w, transposed, x, y, M, K, N, lo, hi);
}

__attribute__((target("default")))
#endif
__attribute__((flatten)) void rows(const Weight& w, bool transposed, const float* x, float* y, int64_t M, int64_t K,
                                   int64_t N, int64_t lo, int64_t hi) {
  rows_in<4, 2>(w, transposed, x, y, M, K, N, lo, hi);
}

// The cores this process may run on (its affinity mask on Linux, which containers and taskset narrow).
int cores() {
  static const int count = [] {
#if defined(__linux__)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
    return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  }();
  return count;
}

// Below this many weight bytes per piece, splitting costs more than it saves.
constexpr int64_t kMinPieceBytes = 64 << 10;

// How long a helper keeps polling for the next product before it sleeps. A decode step calls the kernel every
// few to few tens of microseconds (the small operations between products run on one thread), so a helper that
// slept after each product would be woken for the next, which takes longer than a small product itself.
constexpr auto kAwake = std::chrono::microseconds(300);

inline void relax() {
#if defined(__x86_64__)
  __builtin_ia32_pause();
#endif
}

// One product split into pieces: participants take the next piece not yet taken. A helper that arrives after
// every piece was taken returns without calling `fn`, whose context (the caller's stack) may then be gone; the
// job itself lives as long as anyone holds it.
struct Job {
  void (*fn)(const void* context, int64_t piece);
  const void* context;
  int64_t count;
  std::atomic<int64_t> next{0}, done{0};

  void work() {
    for (int64_t p; (p = next.fetch_add(1)) < count;) {
      fn(context, p);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// cores - 1 helper threads, started on first use and kept for the process.
class Helpers {
 public:
  static Helpers& get() {
    static Helpers* helpers = new Helpers(cores() - 1);  // never destroyed: its threads run until exit
    return *helpers;
  }

  // Runs piece(0) .. piece(count - 1) on the calling thread and the helpers, or on the calling thread alone
  // while another call (another device's program) has them. Returns when every piece is done.
  template <typename Piece>
  void run(int64_t count, const Piece& piece) {
    auto job = std::make_shared<Job>();
    job->fn = [](const void* context, int64_t p) { (*static_cast<const Piece*>(context))(p); };
    job->context = &piece;
    job->count = count;
    const bool shared = count > 1 && !threads_.empty() && !busy_.exchange(true, std::memory_order_acquire);
    if (shared) {
      std::atomic_store(&current_, job);
      generation_.fetch_add(1);
      if (sleeping_.load() > 0) {
        std::lock_guard<std::mutex> lock(mutex_);
        wake_.notify_all();
      }
    }
    job->work();
    while (job->done.load(std::memory_order_acquire) < count) relax();
    if (shared) busy_.store(false, std::memory_order_release);
  }

 private:
  explicit Helpers(int count) {
    for (int i = 0; i < count; ++i) threads_.emplace_back([this] { loop(); });
  }

  void loop() {
    uint64_t seen = generation_.load();
    for (;;) {
      auto until = std::chrono::steady_clock::now() + kAwake;
      while (generation_.load() == seen) {
        if (std::chrono::steady_clock::now() < until) {
          relax();
          continue;
        }
        std::unique_lock<std::mutex> lock(mutex_);
        sleeping_.fetch_add(1);
        wake_.wait(lock, [&] { return generation_.load() != seen; });
        sleeping_.fetch_sub(1);
      }
      seen = generation_.load();
      std::atomic_load(&current_)->work();
    }
  }

  std::vector<std::thread> threads_;
  std::atomic<bool> busy_{false};
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> sleeping_{0};
  std::shared_ptr<Job> current_;
  std::mutex mutex_;
  std::condition_variable wake_;
};

template <typename Piece>
void run_pieces(int64_t count, const Piece& piece) {
  Helpers::get().run(count, piece);
}

// The format named by quant.py (or "float", in w's element type), checked against w's element type.
ffi::ErrorOr<Format> format_of(std::string_view name, ffi::DataType type) {
  if (name == "float" && type == ffi::DataType::F32) return Format::kF32;
  if (name == "float" && type == ffi::DataType::F16) return Format::kF16;
  if (name == "float" && type == ffi::DataType::BF16) return Format::kBF16;
  if ((name == "q8_0" || name == "int8") && type == ffi::DataType::S8) return Format::kInt8;
  if (name == "q4_0" && type == ffi::DataType::U8) return Format::kQ4_0;
  if ((name == "q4_1" || name == "int4") && type == ffi::DataType::U8) return Format::kQ4_1;
  return ffi::Unexpected(ffi::Error::InvalidArgument(
      "hdex_matvec: w's element type does not hold the format " + std::string(name) +
      " (float: f32, f16 or bf16; q8_0, int8: s8; q4_0, q4_1, int4: u8)"));
}

ffi::Error Matvec(Batch x, ffi::AnyBuffer w, ffi::AnyBuffer scale, ffi::AnyBuffer offset, ffi::Result<Batch> y,
                  bool transposed, std::string_view format_name) {
  const auto format = format_of(format_name, w.element_type());
  if (format.has_error()) return format.error();
  const bool four_bits = *format == Format::kQ4_0 || *format == Format::kQ4_1;
  const bool scaled = four_bits || *format == Format::kInt8;
  const int64_t B = x.dimensions()[0], M = x.dimensions()[1], K = x.dimensions()[2];
  const auto wd = w.dimensions();
  if (wd.size() != 3) return ffi::Error::InvalidArgument("hdex_matvec: w is not [batch, rows, columns]");
  const int64_t N = transposed ? wd[1] : wd[2];
  const int64_t inputs = four_bits ? 2 * (transposed ? wd[2] : wd[1]) : (transposed ? wd[2] : wd[1]);
  if (wd[0] != B || inputs != K || y->dimensions()[0] != B || y->dimensions()[1] != M || y->dimensions()[2] != N) {
    return ffi::Error::InvalidArgument("hdex_matvec: shapes of x, w and y do not agree");
  }
  Weight weight{*format, w.untyped_data(), nullptr, nullptr, false};
  if (scaled) {
    const auto sd = scale.dimensions();
    const int64_t groups = sd.size() == 3 ? (transposed ? sd[2] : sd[1]) : 0;
    if (B != 1 || scale.element_type() != ffi::DataType::F16 || sd.size() != 3 || sd[0] != 1 ||
        (transposed ? sd[1] : sd[2]) != N || (groups != 1 && groups * kGroup != K) ||
        (four_bits && K % kGroup != 0)) {
      return ffi::Error::InvalidArgument(
          "hdex_matvec: a quantized w is one product, with float16 scales per output and per 32 inputs or all");
    }
    weight.scale = static_cast<const uint16_t*>(scale.untyped_data());
    weight.per_output = groups == 1;
    if (*format == Format::kQ4_1) {
      if (offset.element_type() != ffi::DataType::F16 || offset.element_count() != scale.element_count()) {
        return ffi::Error::InvalidArgument("hdex_matvec: the offsets of q4_1 and int4 are shaped as their scales");
      }
      weight.offset = static_cast<const uint16_t*>(offset.untyped_data());
    }
  }
  // Bytes of one product's weight: float32 4 per weight, float16 and bfloat16 2, int8 1, 4-bit formats 1 per two.
  const int64_t bytes = N * (four_bits ? K / 2 : K) * (*format == Format::kF32 ? 4 : scaled ? 1 : 2);
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  auto product = [&](int64_t b, float* out, int64_t lo, int64_t hi) {
    const float* xb = xp + b * M * K;
    Weight wb = weight;
    wb.values = static_cast<const char*>(weight.values) + b * bytes;
    // float32 keeps the sums it had before the other formats, and so its tokens.
    if (*format == Format::kF32 && transposed) {
      dots_nk(xb, static_cast<const float*>(wb.values), out, M, K, N, lo, hi);
    } else if (*format == Format::kF32 && M == 1) {
      stream_kn(xb, static_cast<const float*>(wb.values), out, N, lo, hi);
    } else {
      rows(wb, transposed, xb, out, M, K, N, lo, hi);
    }
  };
  const int64_t pieces = std::clamp<int64_t>(B * bytes / kMinPieceBytes, 1, cores());
  if (B > 1 || pieces == 1) {
    // Whole products, split between the pieces by batch element (attention's heads).
    const int64_t count = std::min(B, pieces);
    run_pieces(count, [&](int64_t p) {
      for (int64_t b = B * p / count; b < B * (p + 1) / count; ++b) product(b, yp + b * M * N, 0, transposed ? N : K);
    });
    return ffi::Error::Success();
  }
  if (transposed) {
    run_pieces(pieces, [&](int64_t p) { product(0, yp, N * p / pieces, N * (p + 1) / pieces); });
    return ffi::Error::Success();
  }
  // One product split over K: piece 0 sums into y, the others into `partial`, added at the end. Boundaries are
  // multiples of 4 rows (the stream's pass), of kGroup in the grouped formats (whole groups), but for the last.
  std::vector<float> partial(static_cast<size_t>((pieces - 1) * M * N));
  const int64_t align = four_bits || (scaled && !weight.per_output) ? kGroup : 4;
  auto bound = [&](int64_t p) { return p == pieces ? K : K * p / pieces / align * align; };
  run_pieces(pieces, [&](int64_t p) {
    product(0, p == 0 ? yp : partial.data() + (p - 1) * M * N, bound(p), bound(p + 1));
  });
  for (int64_t p = 1; p < pieces; ++p) {
    const float* q = partial.data() + (p - 1) * M * N;
    for (int64_t i = 0; i < M * N; ++i) yp[i] += q[i];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(HdexMatvec, Matvec,
                              ffi::Ffi::Bind()
                                  .Arg<Batch>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<Batch>()
                                  .Attr<bool>("transposed")
                                  .Attr<std::string_view>("format"));
