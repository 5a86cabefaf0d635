// The matrix products of decode and short prompts on the CPU: y[b, M, N] = x[b, M, K] @ W[b] for a few rows M
// (the projections: one product of M = batch rows x tokens; attention at decode: one per KV head, M = its query
// heads).
//
// XLA CPU runs these products through Eigen's contraction, which reads SmolLM2's layer weights at 15-21 GB/s
// where a plain stream reaches about 30 (docs/performance.md, "The matrix-vector kernel"). Here one row streams
// the weight once, in contiguous pieces, one per core; several rows use register tiles over blocks of the
// weight small enough to stay in L2 while every row passes over them. Sums are float32, with fused
// multiply-adds where the CPU has them. It is an XLA FFI handler: `hdex_jax/matvec.py` builds, registers and
// calls it.
//
// W[b] is either [K, N] (`transposed` false: the projections, stored [in, out]; attention's values [S, hd]) or
// [N, K] (`transposed` true: a tied LM head contracting the embedding [V, E] on E; attention's keys [S, hd]).
// Several products are split between the pieces whole; a single one over K for [K, N] (each piece writes
// partial sums, added at the end) and over N for [N, K] (each writes its own outputs). The pieces run on the
// calling thread and on helper threads of this library, which stay awake between the products of a step.

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
#include <thread>
#include <vector>

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

// Rows of w per block: a block of [kBlockRows, N] stays in L2 while every group of rows of x passes over it, so
// the weight comes from memory once however many rows x has.
constexpr int64_t kBlockRows = 32;
constexpr int kTileRows = 4;
static_assert(kTileRows == 4, "blocked's remainder switch covers groups of 1 to 3 rows");

// y[R rows, V registers of columns at nb] += x[R rows, kb:ke] @ w[kb:ke, those columns]: R x V registers of
// sums, V of the weight's row and one of x's broadcast value, within the register file.
template <int W, int V, int R>
__attribute__((always_inline)) inline void tile_kn(const float* x, int64_t K, const float* w, int64_t N, float* y,
                                                   int64_t kb, int64_t ke, int64_t nb) {
  typedef typename Lanes<W>::type Vec;
  Vec acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = load<W>(y + r * N + nb + W * v);
  for (int64_t k = kb; k < ke; ++k) {
    Vec wv[V];
    for (int v = 0; v < V; ++v) wv[v] = load<W>(w + k * N + nb + W * v);
    for (int r = 0; r < R; ++r) {
      const float a = x[r * K + k];
      for (int v = 0; v < V; ++v) acc[r][v] += a * wv[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) store<W>(y + r * N + nb + W * v, acc[r][v]);
}

// y[M, N] = x[M, k0:k1] @ w[k0:k1, N] for several rows: register tiles of kTileRows rows x W * V columns over
// blocks of w that stay in L2.
template <int W, int V>
__attribute__((always_inline)) inline void blocked(const float* x, const float* w, float* y, int64_t M, int64_t K,
                                                   int64_t N, int64_t k0, int64_t k1) {
  constexpr int64_t tile = W * V;
  std::memset(y, 0, sizeof(float) * M * N);
  const int64_t tiled = N / tile * tile;
  for (int64_t kb = k0; kb < k1; kb += kBlockRows) {
    const int64_t ke = std::min(kb + kBlockRows, k1);
    for (int64_t nb = 0; nb < tiled; nb += tile) {
      int64_t m = 0;
      for (; m + kTileRows <= M; m += kTileRows) tile_kn<W, V, kTileRows>(x + m * K, K, w, N, y + m * N, kb, ke, nb);
      switch (M - m) {
        case 3: tile_kn<W, V, 3>(x + m * K, K, w, N, y + m * N, kb, ke, nb); break;
        case 2: tile_kn<W, V, 2>(x + m * K, K, w, N, y + m * N, kb, ke, nb); break;
        case 1: tile_kn<W, V, 1>(x + m * K, K, w, N, y + m * N, kb, ke, nb); break;
        default: break;
      }
    }
    for (int64_t m = 0; m < M; ++m) {  // the last N % tile columns
      for (int64_t k = kb; k < ke; ++k) {
        const float a = x[m * K + k];
        for (int64_t n = tiled; n < N; ++n) y[m * N + n] += a * w[k * N + n];
      }
    }
  }
}

// One version per instruction set, each with the tile that fits its registers (AVX-512: 32 of 16 floats, 4 x 4
// tiles; AVX2: 16 of 8, 4 x 2; SSE: 16 of 4, 4 x 2); the loader picks the best the CPU has.
#if defined(__x86_64__)
__attribute__((target("arch=x86-64-v4"))) void blocked_kn(const float* x, const float* w, float* y, int64_t M,
                                                           int64_t K, int64_t N, int64_t k0, int64_t k1) {
  blocked<16, 4>(x, w, y, M, K, N, k0, k1);
}

__attribute__((target("arch=x86-64-v3"))) void blocked_kn(const float* x, const float* w, float* y, int64_t M,
                                                           int64_t K, int64_t N, int64_t k0, int64_t k1) {
  blocked<8, 2>(x, w, y, M, K, N, k0, k1);
}

__attribute__((target("default")))
#endif
void blocked_kn(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N, int64_t k0, int64_t k1) {
  blocked<4, 2>(x, w, y, M, K, N, k0, k1);
}

// y[M, N] = x[M, k0:k1] @ w[k0:k1, N], with w row-major [K, N].
void rows_kn(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N, int64_t k0, int64_t k1) {
  if (M == 1) {
    stream_kn(x, w, y, N, k0, k1);
  } else {
    blocked_kn(x, w, y, M, K, N, k0, k1);
  }
}

// y[M, n0:n1] = x[M, K] @ w[n0:n1, K]^T, with w row-major [N, K]: one dot product per output.
HDEX_CLONES void rows_nk(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N, int64_t n0,
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

ffi::Error Matvec(Batch x, Batch w, ffi::Result<Batch> y, bool transposed) {
  const int64_t B = x.dimensions()[0], M = x.dimensions()[1], K = x.dimensions()[2];
  const int64_t N = transposed ? w.dimensions()[1] : w.dimensions()[2];
  if (w.dimensions()[0] != B || (transposed ? w.dimensions()[2] : w.dimensions()[1]) != K ||
      y->dimensions()[0] != B || y->dimensions()[1] != M || y->dimensions()[2] != N) {
    return ffi::Error::InvalidArgument("hdex_matvec: shapes of x, w and y do not agree");
  }
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  auto product = [&](int64_t b, float* out, int64_t lo, int64_t hi) {
    const float* xb = xp + b * M * K;
    const float* wb = wp + b * K * N;
    if (transposed) {
      rows_nk(xb, wb, out, M, K, N, lo, hi);
    } else {
      rows_kn(xb, wb, out, M, K, N, lo, hi);
    }
  };
  const int64_t pieces = std::clamp<int64_t>(B * K * N * 4 / kMinPieceBytes, 1, cores());
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
  // multiples of 4 rows but for the last.
  std::vector<float> partial(static_cast<size_t>((pieces - 1) * M * N));
  auto bound = [&](int64_t p) { return p == pieces ? K : K * p / pieces / 4 * 4; };
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
                                  .Arg<Batch>()
                                  .Ret<Batch>()
                                  .Attr<bool>("transposed"));
