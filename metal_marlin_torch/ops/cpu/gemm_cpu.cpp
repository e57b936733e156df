// Fused dequantize-GEMV / tile dequantization for marlin::gemm on CPU (issue 24 item 4).
//
// Plain C++17, no torch headers: built on first use by metal_marlin_torch/ops/cpu/__init__.py
// with the system compiler (-O3, the host's vector ISA) and called through ctypes, so the build
// takes a second or two and needs no torch development files. Weights are read in the canonical
// layout of docs/FORMAT.md (uint32 [N, KW], row n one little-endian bit stream along K, element
// k at bit k * bits): one row is one contiguous stream, which is what a CPU GEMV wants.
//
// Per row and scale group: the group's codes are decoded through the format's value table
// (lut, 2^bits floats: q for the affine integers, the E2M1 / NF / FP8 grids otherwise; 4- and
// 2-bit codes through a table of whole bytes, so one load gives 2 or 4 values), the group's
// scale and bias applied (w = lut[q] * s + b, the reference's arithmetic), and the result
// (in L1) multiplied with every activation row. Accumulation is float32 with 16 independent
// partial sums (vectorizable without reassociation flags).

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MARLIN_AVX2 1
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace {

enum ScaleKind { F32 = 0, F16 = 1, BF16 = 2 };

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      int e = -1;
      do { ++e; man <<= 1; } while (!(man & 0x400));
      bits = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (man & 0x3ff) << 13;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | man << 13;
  } else {
    bits = sign | (exp + 112) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float scale_at(const void* p, int kind, int64_t i) {
  switch (kind) {
    case F16: return half_to_float(static_cast<const uint16_t*>(p)[i]);
    case BF16: {
      const uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(p)[i]) << 16;
      float f;
      std::memcpy(&f, &bits, 4);
      return f;
    }
    default: return static_cast<const float*>(p)[i];
  }
}

struct Args {
  const uint32_t* w;
  int64_t n, kw, k;
  const void* scales;
  const void* biases;  // nullptr: no affine bias
  int scale_kind;
  int64_t n_groups, group;
  int bits;
  const float* lut;
  int64_t gstride = 0;   // scales / biases row stride (n_groups but for a K slice)
  int64_t row_words = 0;  // words readable from a row pointer (kw but for a K slice)
  std::vector<float> byte_table;  // 4 bits: [256][2], 2 bits: [256][4]
  bool identity = false;  // lut[q] == q (affine integers): 8-bit codes convert directly
};

// Codes [k0, k0 + len) of row `row` as table values (before scale and bias).
inline void decode(const Args& a, const uint32_t* row, int64_t k0, int64_t len, float* out) {
  const int bits = a.bits;
  if (bits == 4 && (k0 & 1) == 0) {
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(row) + (k0 >> 1);
    const float* t = a.byte_table.data();
    const int64_t pairs = len >> 1;
    for (int64_t i = 0; i < pairs; ++i) std::memcpy(out + 2 * i, t + 2 * bytes[i], 8);
    if (len & 1) out[len - 1] = a.lut[bytes[pairs] & 15];
    return;
  }
  if (bits == 8) {
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(row) + k0;
    if (a.identity) {
      for (int64_t i = 0; i < len; ++i) out[i] = static_cast<float>(bytes[i]);  // vectorizes
    } else {
      for (int64_t i = 0; i < len; ++i) out[i] = a.lut[bytes[i]];
    }
    return;
  }
  if (bits == 2 && (k0 & 3) == 0) {
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(row) + (k0 >> 2);
    const float* t = a.byte_table.data();
    const int64_t quads = len >> 2;
    for (int64_t i = 0; i < quads; ++i) std::memcpy(out + 4 * i, t + 4 * bytes[i], 16);
    for (int64_t i = quads * 4; i < len; ++i) out[i] = a.lut[(bytes[i >> 2] >> (2 * (i & 3))) & 3];
    return;
  }
  // any width (3 bits; unaligned starts): a 64-bit window over the bit stream
  const uint32_t mask = (1u << bits) - 1;
  for (int64_t i = 0; i < len; ++i) {
    const int64_t bit = (k0 + i) * bits;
    const int64_t word = bit >> 5;
    uint64_t v = row[word];
    if (word + 1 < a.row_words) v |= static_cast<uint64_t>(row[word + 1]) << 32;
    out[i] = a.lut[(v >> (bit & 31)) & mask];
  }
}

// w = lut[q] * s + b over one group, in place.
inline void apply_scale(float* buf, int64_t len, float s, float b) {
  for (int64_t i = 0; i < len; ++i) buf[i] = buf[i] * s + b;
}

inline float dot(const float* a, const float* b, int64_t len) {
  float acc[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= len; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += a[i + j] * b[i + j];
  float s = 0;
  for (int j = 0; j < 16; ++j) s += acc[j];
  for (; i < len; ++i) s += a[i] * b[i];
  return s;
}

void build_tables(Args& a) {
  a.identity = true;
  for (int q = 0; q < (1 << a.bits); ++q) a.identity = a.identity && a.lut[q] == static_cast<float>(q);
  if (a.bits == 4) {
    a.byte_table.resize(512);
    for (int b = 0; b < 256; ++b) {
      a.byte_table[2 * b] = a.lut[b & 15];
      a.byte_table[2 * b + 1] = a.lut[b >> 4];
    }
  } else if (a.bits == 2) {
    a.byte_table.resize(1024);
    for (int b = 0; b < 256; ++b)
      for (int j = 0; j < 4; ++j) a.byte_table[4 * b + j] = a.lut[(b >> (2 * j)) & 3];
  }
}

// Decoded, scaled row `n` into out[0, k).
inline void dequant_row(const Args& a, int64_t n, float* out) {
  const uint32_t* row = a.w + n * a.kw;
  decode(a, row, 0, a.k, out);  // all codes first (see marlin_cpu_gemv), then scale and bias
  for (int64_t g = 0; g < a.n_groups; ++g) {
    const int64_t k0 = g * a.group, len = std::min(a.group, a.k - k0);
    const float s = scale_at(a.scales, a.scale_kind, n * a.gstride + g);
    const float b = a.biases ? scale_at(a.biases, a.scale_kind, n * a.gstride + g) : 0.0f;
    apply_scale(out + k0, len, s, b);
  }
}


#ifdef MARLIN_AVX2
// AVX2 + FMA (x86-64): 8 codes at a time decoded in registers: the codes of one word spread
// over 8 lanes by per-lane shifts, looked up in the 16-entry (or smaller) table by two
// in-register permutes (vpermps) and a blend on bit 3; 8-bit codes widened from 8 bytes and
// converted (affine) or gathered from the 256-entry table (fp8). Then w = v * s + b and one FMA
// per activation row. Used where every group starts on a whole word (K and the group a
// multiple of 8 / 16 / 4 codes for 4 / 2 / 8 bits); otherwise the portable path below.
struct Avx2Table {
  __m256 lo, hi;
};

inline Avx2Table avx2_table(const Args& a) {
  float t[16] = {0};
  for (int i = 0; i < (1 << std::min(a.bits, 4)); ++i) t[i] = a.lut[i];
  return {_mm256_loadu_ps(t), _mm256_loadu_ps(t + 8)};
}

inline bool avx2_ok(const Args& a) {
  const int64_t per = a.bits == 4 ? 8 : a.bits == 2 ? 16 : a.bits == 8 ? 8 : 0;
  return per && a.group % per == 0 && a.k % per == 0;
}

// The 8 (or, 2 bits, 16) values at codes [c, c + 8) of `row`, before scale and bias.
template <int BITS>
inline __m256 avx2_codes(const Args& a, const Avx2Table& t, const uint32_t* row, int64_t c, int half) {
  if constexpr (BITS == 4) {
    const __m256i q = _mm256_and_si256(
        _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(row[c >> 3])),
                          _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
        _mm256_set1_epi32(15));
    if (a.identity) return _mm256_cvtepi32_ps(q);  // affine int4: the value is q
    const __m256 lo = _mm256_permutevar8x32_ps(t.lo, q), hi = _mm256_permutevar8x32_ps(t.hi, q);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(q, 28)));
  } else if constexpr (BITS == 2) {
    const __m256i q = _mm256_and_si256(
        _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(row[c >> 4])),
                          _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)),
        _mm256_set1_epi32(3));
    (void)half;
    return a.identity ? _mm256_cvtepi32_ps(q) : _mm256_permutevar8x32_ps(t.lo, q);
  } else {  // 8 bits
    (void)t;
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(reinterpret_cast<const uint8_t*>(row) + c));
    const __m256i q = _mm256_cvtepu8_epi32(bytes);
    return a.identity ? _mm256_cvtepi32_ps(q) : _mm256_i32gather_ps(a.lut, q, 4);
  }
}

// 2 bits: codes c..c+7 are the low or high half of word c / 16
template <int BITS>
inline __m256 avx2_values(const Args& a, const Avx2Table& t, const uint32_t* row, int64_t c) {
  if constexpr (BITS == 2) {
    const uint32_t w = row[c >> 4] >> (2 * (c & 15));
    return avx2_codes<2>(a, t, &w - 0, 0, 0);
  } else {
    return avx2_codes<BITS>(a, t, row, c, 0);
  }
}

// Per weight row: per scale group, p = sum(v * x) over the group's codes (v the table value,
// one FMA per 8 codes and activation row), then acc += s * p (a vector FMA with the group's
// scale) and, for affine formats, the bias term b * sum(x over the group) from xsum (computed
// once per call): w = v * s + b is never formed, so the inner loop is decode + FMA.
// Per weight row: per scale group, p = sum(v * x) over the group's codes (v the table value,
// one FMA per 8 codes and activation row), then acc += s * p (a vector FMA with the group's
// scale) and, for affine formats, the bias term b * sum(x over the group) from xsum (computed
// once per call): w = v * s + b is never formed, so the inner loop is decode + FMA. MM (1-4
// activation rows sharing each decode) is a template parameter so the partial sums stay in
// registers (a run-time count kept them on the stack: a store-to-load chain per FMA).
template <int BITS, int MM>
void avx2_gemv_block(const Args& a, const Avx2Table& t, const uint32_t* row, const float* x,
                     int64_t ldx, const float* xsum, int64_t r, float* out) {
  __m256 acc[MM];
  float bsum[MM];
  for (int i = 0; i < MM; ++i) acc[i] = _mm256_setzero_ps(), bsum[i] = 0.0f;
  for (int64_t g = 0; g < a.n_groups; ++g) {
    const int64_t c0 = g * a.group, c1 = c0 + a.group;
    __m256 p0[MM], p1[MM];
    for (int i = 0; i < MM; ++i) p0[i] = p1[i] = _mm256_setzero_ps();
    for (int64_t c = c0; c < c1; c += 16) {
      const __m256 v0 = avx2_values<BITS>(a, t, row, c);
      const __m256 v1 = avx2_values<BITS>(a, t, row, c + 8);
      for (int i = 0; i < MM; ++i) {
        const float* xr = x + i * ldx + c;
        p0[i] = _mm256_fmadd_ps(v0, _mm256_loadu_ps(xr), p0[i]);
        p1[i] = _mm256_fmadd_ps(v1, _mm256_loadu_ps(xr + 8), p1[i]);
      }
    }
    const __m256 s = _mm256_set1_ps(scale_at(a.scales, a.scale_kind, r * a.n_groups + g));
    for (int i = 0; i < MM; ++i) acc[i] = _mm256_fmadd_ps(_mm256_add_ps(p0[i], p1[i]), s, acc[i]);
    if (a.biases) {
      const float bg = scale_at(a.biases, a.scale_kind, r * a.n_groups + g);
      for (int i = 0; i < MM; ++i) bsum[i] += bg * xsum[i * a.n_groups + g];
    }
  }
  for (int i = 0; i < MM; ++i) {
    float lanes[8];
    _mm256_storeu_ps(lanes, acc[i]);
    float sum = bsum[i];
    for (float v : lanes) sum += v;
    out[i] = sum;
  }
}

template <int BITS>
void avx2_gemv_rows(const Args& a, const float* x, int64_t m, int64_t ldx, const float* xsum,
                    const float* bias, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const Avx2Table t = avx2_table(a);
  for (int64_t r = n0; r < n1; ++r) {
    const uint32_t* row = a.w + r * a.kw;
    for (int64_t i0 = 0; i0 < m; i0 += 4) {  // up to 4 activation rows share each decode
      float out[4];
      const float* xs = x + i0 * ldx;
      const float* ss = xsum + i0 * a.n_groups;
      switch (std::min<int64_t>(4, m - i0)) {
        case 1: avx2_gemv_block<BITS, 1>(a, t, row, xs, ldx, ss, r, out); break;
        case 2: avx2_gemv_block<BITS, 2>(a, t, row, xs, ldx, ss, r, out); break;
        case 3: avx2_gemv_block<BITS, 3>(a, t, row, xs, ldx, ss, r, out); break;
        default: avx2_gemv_block<BITS, 4>(a, t, row, xs, ldx, ss, r, out); break;
      }
      for (int64_t i = 0; i < std::min<int64_t>(4, m - i0); ++i)
        y[(i0 + i) * ldy + r] = out[i] + (bias ? bias[r] : 0.0f);
    }
  }
}

template <int BITS>
void avx2_dequant_rows(const Args& a, int64_t n0, int64_t r0, int64_t r1, float* out, int64_t ldo) {
  const Avx2Table t = avx2_table(a);
  for (int64_t r = r0; r < r1; ++r) {
    const uint32_t* row = a.w + (n0 + r) * a.kw;
    float* o = out + r * ldo;
    for (int64_t g = 0; g < a.n_groups; ++g) {
      const __m256 s = _mm256_set1_ps(scale_at(a.scales, a.scale_kind, (n0 + r) * a.gstride + g));
      const __m256 b = _mm256_set1_ps(a.biases ? scale_at(a.biases, a.scale_kind, (n0 + r) * a.gstride + g) : 0.f);
      for (int64_t c = g * a.group, c1 = c + a.group; c < c1; c += 8)
        _mm256_storeu_ps(o + c, _mm256_fmadd_ps(avx2_values<BITS>(a, t, row, c), s, b));
    }
  }
}
#endif  // MARLIN_AVX2

// A persistent pool: threads are started once (thread creation is expensive, very much so
// under sandboxes such as gVisor) and woken per call; idle workers sleep on a condition
// variable (no spinning that would take cores from torch's own threads between calls).
class Pool {
 public:
  static Pool& get() {
    static Pool* pool = new Pool;  // never destroyed: its detached workers outlive main()
    return *pool;
  }

  // body(t) for t in [0, n), t = 0 on the calling thread; returns when all are done.
  void run(int n, const std::function<void(int)>& body) {
    if (n <= 1) {
      body(0);
      return;
    }
    std::lock_guard<std::mutex> call_lock(call_mu_);  // one parallel call at a time
    grow(n - 1);
    {
      std::lock_guard<std::mutex> lk(mu_);
      job_ = &body;
      tasks_ = n - 1;
      next_ = 1;
      pending_ = n - 1;
      ++generation_;
    }
    cv_.notify_all();
    body(0);
    std::unique_lock<std::mutex> lk(mu_);
    done_cv_.wait(lk, [&] { return pending_ == 0; });
    job_ = nullptr;
  }

 private:
  void grow(int want) {
    for (; workers_ < want; ++workers_) std::thread([this] { loop(); }).detach();
  }

  void loop() {
    uint64_t seen = 0;
    for (;;) {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return generation_ != seen && next_ <= tasks_; });
      seen = generation_;
      const int t = next_++;
      const std::function<void(int)>* job = job_;
      lk.unlock();
      (*job)(t);
      lk.lock();
      if (--pending_ == 0) done_cv_.notify_one();
    }
  }

  std::mutex call_mu_, mu_;
  std::condition_variable cv_, done_cv_;
  int workers_ = 0;
  const std::function<void(int)>* job_ = nullptr;
  uint64_t generation_ = 0;
  int tasks_ = 0, next_ = 1, pending_ = 0;
};

// body(r0, r1) over [0, n) split between up to `threads` threads, at least 64 rows each.
// Built with OpenMP against torch's own libgomp (ops/cpu/__init__.py), the threads are torch's
// intra-op pool: no second pool competing with torch's (its idle threads spin for a while
// after every parallel op, and took the cores from a separate pool's threads: int4 ran at half
// speed right after a torch matmul on a 16-core host). Otherwise the Pool above.
template <typename F>
void parallel_rows(int64_t n, int threads, F&& body) {
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, (n + 63) / 64)));
  const int64_t per = (n + threads - 1) / threads;
#ifdef _OPENMP
  if (threads > 1) {
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int t = 0; t < threads; ++t) {
      const int64_t a = std::min<int64_t>(n, t * per), b = std::min<int64_t>(n, a + per);
      if (a < b) body(a, b);
    }
    return;
  }
#endif
  const std::function<void(int)> task = [&](int t) {
    const int64_t a = std::min<int64_t>(n, t * per), b = std::min<int64_t>(n, a + per);
    if (a < b) body(a, b);
  };
  Pool::get().run(threads, task);
}

Args make_args(const uint32_t* w, int64_t n, int64_t kw, int64_t k, const void* scales,
               const void* biases, int scale_kind, int64_t n_groups, int64_t group, int bits,
               const float* lut) {
  Args a{w, n, kw, k, scales, biases, scale_kind, n_groups, group, bits, lut, {}};
  a.gstride = n_groups;
  a.row_words = kw;
  build_tables(a);
  return a;
}

// Rows n0..n1 of the weight `a` describes, decoded to float32 rows of stride ldo (both dequant
// entry points below: whole rows, or a K slice whose Args point into the rows).
void dequant_rows(const Args& a, int bits, int64_t n0, int64_t n1, float* out, int64_t ldo, int threads) {
#ifdef MARLIN_AVX2
  if (avx2_ok(a)) {
    parallel_rows(n1 - n0, threads, [&](int64_t r0, int64_t r1) {
      if (bits == 4) avx2_dequant_rows<4>(a, n0, r0, r1, out, ldo);
      else if (bits == 2) avx2_dequant_rows<2>(a, n0, r0, r1, out, ldo);
      else avx2_dequant_rows<8>(a, n0, r0, r1, out, ldo);
    });
    return;
  }
#endif
  parallel_rows(n1 - n0, threads, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) dequant_row(a, n0 + r, out + r * ldo);
  });
}

}  // namespace

extern "C" {

int marlin_cpu_abi_version() { return 2; }

int marlin_cpu_openmp() {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

// y[m, n] = sum_k x[m, k] * W_hat[n, k] (+ bias[n]); x float32 [M, K] (row stride ldx),
// y float32 [M, N] (row stride ldy). Rows of W are split between `threads` threads.
void marlin_cpu_gemv(const float* x, int64_t m, int64_t ldx, const uint32_t* w, int64_t n,
                     int64_t kw, int64_t k, const void* scales, const void* biases, int scale_kind,
                     int64_t n_groups, int64_t group, int bits, const float* lut, const float* bias,
                     float* y, int64_t ldy, int threads) {
  const Args a = make_args(w, n, kw, k, scales, biases, scale_kind, n_groups, group, bits, lut);
#ifdef MARLIN_AVX2
  if (avx2_ok(a) && (a.group % 16 == 0)) {
    std::vector<float> xsum(static_cast<size_t>(m * n_groups), 0.0f);  // sum(x) per group
    if (biases)
      for (int64_t i = 0; i < m; ++i)
        for (int64_t g = 0; g < n_groups; ++g) {
          float s = 0;
          for (int64_t c = g * group; c < (g + 1) * group; ++c) s += x[i * ldx + c];
          xsum[i * n_groups + g] = s;
        }
    parallel_rows(n, threads, [&](int64_t n0, int64_t n1) {
      if (bits == 4) avx2_gemv_rows<4>(a, x, m, ldx, xsum.data(), bias, y, ldy, n0, n1);
      else if (bits == 2) avx2_gemv_rows<2>(a, x, m, ldx, xsum.data(), bias, y, ldy, n0, n1);
      else avx2_gemv_rows<8>(a, x, m, ldx, xsum.data(), bias, y, ldy, n0, n1);
    });
    return;
  }
#endif
  parallel_rows(n, threads, [&](int64_t n0, int64_t n1) {
    // the whole row is decoded before it is read back: values stored one or two at a time and
    // read back as vectors right away would stall on store-to-load forwarding
    std::vector<float> buf(static_cast<size_t>(k) + 16);
    std::vector<float> acc(static_cast<size_t>(m));
    for (int64_t r = n0; r < n1; ++r) {
      dequant_row(a, r, buf.data());
      for (int64_t i = 0; i < m; ++i) acc[i] = dot(buf.data(), x + i * ldx, k);
      const float bn = bias ? bias[r] : 0.0f;
      for (int64_t i = 0; i < m; ++i) y[i * ldy + r] = acc[i] + bn;
    }
  });
}

// out[r - n0, :] = W_hat[r, :] for r in [n0, n1): float32 rows of length K (row stride ldo).
void marlin_cpu_dequant(const uint32_t* w, int64_t n, int64_t kw, int64_t k, const void* scales,
                        const void* biases, int scale_kind, int64_t n_groups, int64_t group, int bits,
                        const float* lut, int64_t n0, int64_t n1, float* out, int64_t ldo,
                        int threads) {
  const Args a = make_args(w, n, kw, k, scales, biases, scale_kind, n_groups, group, bits, lut);
  dequant_rows(a, bits, n0, n1, out, ldo, threads);
}

// out[r - n0, c - k0] = W_hat[r, c] for r in [n0, n1), c in [k0, k1): a K slice of the rows
// (prefill on long K: slices of every row keep the BLAS call's shape wide, see ops/cpu).
// k0 must be a multiple of 32 codes (whole words for every width) and, unless the layer is
// per-channel (group >= k), of the group; k1 a multiple of the group or k.
void marlin_cpu_dequant_slice(const uint32_t* w, int64_t n, int64_t kw, int64_t k,
                              const void* scales, const void* biases, int scale_kind,
                              int64_t n_groups, int64_t group, int bits, const float* lut,
                              int64_t n0, int64_t n1, int64_t k0, int64_t k1, float* out,
                              int64_t ldo, int threads) {
  const int64_t off = k0 * bits / 32;  // words before the slice in each row
  const int64_t len = k1 - k0;
  const bool per_channel = group >= k;
  const int64_t g = per_channel ? len : group;
  const int64_t g0 = per_channel ? 0 : k0 / group;
  const int64_t es = scale_kind == F32 ? 4 : 2;
  const char* sp = static_cast<const char*>(scales) + g0 * es;
  const char* bp = biases ? static_cast<const char*>(biases) + g0 * es : nullptr;
  Args a = make_args(w + off, n, kw, len, sp, bp, scale_kind, (len + g - 1) / g, g, bits, lut);
  a.gstride = n_groups;
  a.row_words = kw - off;
  dequant_rows(a, bits, n0, n1, out, ldo, threads);
}

}  // extern "C"
