// Fused dequantize-GEMV / tile dequantization for marlin::gemm on CPU (issue 24 item 4).
//
// Plain C++17, no torch headers: built on first use by metal_marlin_torch/ops/cpu/__init__.py
// with the system compiler (-O3, the host's vector ISA) and called through ctypes, so the build
// takes a second or two and needs no torch development files. Weights are read in the canonical
// layout of docs/FORMAT.md (uint32 [N, KW], row n one little-endian bit stream along K, element
// k at bit k * bits): one row is one contiguous stream, which is what a CPU GEMV wants.
//
// GEMV (M <= 8 activation rows): per weight row and scale group, 16 codes at a time are decoded
// in SIMD registers (AVX2 + FMA on x86-64, NEON on arm64: shifts and masks spread the codes
// over the lanes, a 16-entry table is looked up in registers: vpermps / tbl) and multiplied into
// float32 partial sums with FMA; the group's scale multiplies the group's partial sum once
// (acc += s * sum(v * x)), the affine bias enters as b * sum(x over the group). The group's
// codes past the last whole 16 (a K or per-channel group that is not a multiple of 16) are
// decoded one at a time. Other widths (3 bits) and other ISAs: a portable path that decodes a
// whole row through byte tables, then an auto-vectorized dot product.
//
// Prefill (more rows): tiles of the weight decoded to float32 (the caller multiplies them with
// BLAS), SIMD on AVX2 for 2/4/8 bits, else the portable row decoder.
//
// Threads: rows are cut into chunks that the calling thread and a small pool of sleeping
// workers take from one atomic counter (Pool below), so a worker that the OS does not run
// promptly (a loaded machine) costs nothing: the caller takes its chunks.

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MARLIN_AVX2 1
#elif defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define MARLIN_NEON 1
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <memory>
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
#if defined(__F16C__) && defined(MARLIN_AVX2)
    case F16: return _cvtsh_ss(static_cast<const uint16_t*>(p)[i]);  // one vcvtph2ps
#elif defined(__aarch64__)
    case F16: return static_cast<float>(static_cast<const __fp16*>(p)[i]);  // one fcvt
#else
    case F16: return half_to_float(static_cast<const uint16_t*>(p)[i]);
#endif
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
  int f8 = 0;  // 8-bit tables that are an fp16 bit pattern: 1 e5m2 (the fp16's top byte),
               // 2 e4m3 (/ 2^8, NaN at 0x7F / 0xFF); 0 other (see build_tables)
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

// fp16 bits of an 8-bit code read as e5m2 (kind 1) or e4m3 / 2^8 (kind 2, NaN codes as 480)
inline uint16_t f8_half_bits(int kind, uint32_t q) {
  return static_cast<uint16_t>(kind == 1 ? q << 8 : ((q & 0x7F) << 7) | ((q & 0x80) << 8));
}

void build_tables(Args& a) {
  a.identity = true;
  for (int q = 0; q < (1 << a.bits); ++q) a.identity = a.identity && a.lut[q] == static_cast<float>(q);
  if (a.bits == 8 && !a.identity) {
    // the table is e5m2 or e4m3 when every code's value is the bit formula's, exactly (NaN for
    // NaN); the SIMD decode then converts codes with F16C instead of a gather
    for (int kind = 1; kind <= 2 && !a.f8; ++kind) {
      bool same = true;
      for (uint32_t q = 0; q < 256 && same; ++q) {
        const float want = a.lut[q];
        const bool nan_code = kind == 2 && (q & 0x7F) == 0x7F;
        const float got = half_to_float(f8_half_bits(kind, q)) * (kind == 2 ? 256.0f : 1.0f);
        same = (std::isnan(want) && (std::isnan(got) || nan_code)) || (!nan_code && want == got);
      }
      if (same) a.f8 = kind;
    }
  }
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


// Code c of a row as an integer: any width, any position (a 64-bit window over the bit stream).
inline uint32_t code_at(const Args& a, const uint32_t* row, int64_t c) {
  const int64_t bit = c * a.bits;
  const int64_t word = bit >> 5;
  uint64_t v = row[word];
  if (word + 1 < a.row_words) v |= static_cast<uint64_t>(row[word + 1]) << 32;
  return static_cast<uint32_t>(v >> (bit & 31)) & ((1u << a.bits) - 1);
}

// Codes [c, c1) of a group (fewer than one SIMD block: a tail) times MM activation rows,
// added to p[0..MM).
template <int MM>
inline void tail_dot(const Args& a, const uint32_t* row, const float* x, int64_t ldx, int64_t c,
                     int64_t c1, float* p) {
  for (; c < c1; ++c) {
    const float v = a.lut[code_at(a, row, c)];
    for (int i = 0; i < MM; ++i) p[i] += v * x[i * ldx + c];
  }
}

// The group's scale and (affine) bias of weight row r, group g.
inline float group_scale(const Args& a, int64_t r, int64_t g) {
  return scale_at(a.scales, a.scale_kind, r * a.gstride + g);
}
inline float group_bias(const Args& a, int64_t r, int64_t g) {
  return a.biases ? scale_at(a.biases, a.scale_kind, r * a.gstride + g) : 0.0f;
}

#ifdef MARLIN_AVX2
// AVX2 + FMA (x86-64). 8 codes per __m256: the codes' word broadcast to 8 lanes and shifted per
// lane (vpsrlvd), then for affine integers masked and converted (cvtdq2ps); for 16-entry tables
// (E2M1, NF4) looked up by two in-register permutes (vpermps reads only the index's low 3
// bits, so no mask is needed) and a blend on bit 3 (moved to the sign bit by a shift: blendv
// reads the sign). 8-bit codes: 8 bytes widened, converted (affine) or gathered from the
// 256-entry table (fp8).
struct Avx2Table {
  __m256 lo, hi;      // lut[0..8), lut[8..16)
  __m256i byte[4];    // byte j of lut[q] at byte q of both 128-bit lanes (vpshufb tables)
};

inline Avx2Table avx2_table(const Args& a) {
  float t[16] = {0};
  for (int i = 0; i < (1 << std::min(a.bits, 4)); ++i) t[i] = a.lut[i];
  Avx2Table r;
  r.lo = _mm256_loadu_ps(t);
  r.hi = _mm256_loadu_ps(t + 8);
  alignas(16) uint8_t b[4][16];
  for (int q = 0; q < 16; ++q) {
    uint32_t bits;
    std::memcpy(&bits, t + q, 4);
    for (int j = 0; j < 4; ++j) b[j][q] = static_cast<uint8_t>(bits >> (8 * j));
  }
  for (int j = 0; j < 4; ++j)
    r.byte[j] = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(b[j])));
  return r;
}

// The GEMV reads 4-bit codes in "pair order": within each whole 8-code step, the lanes of a
// decoded vector hold codes {0, 2, 4, 6, 1, 3, 5, 7} (what the 32-code decode below produces
// without any cross-lane shuffle); the activations are permuted the same way once per call
// (avx2_pair_order_x), so the products are the same ones. Codes past the last whole 8 stay.
constexpr int kPairOrder[8] = {0, 2, 4, 6, 1, 3, 5, 7};

// 32 values of 4-bit codes [c, c + 32) (c a multiple of 8), in pair order, as 4 x 8 floats,
// for any 16-entry table: the 16 bytes split into low nibbles (lane 0: even codes) and high
// nibbles (lane 1: odd codes); each byte of the float values looked up by vpshufb in its byte
// table, and the four bytes interleaved into floats by unpacks (all within 128-bit lanes):
// 3 + 12 shuffle-port ops for 32 codes, against 6 per 8 for permutes and a blend.
inline void avx2_values32(const Avx2Table& t, const uint32_t* row, int64_t c, __m256 f[4]) {
  const __m128i b = _mm_loadu_si128(
      reinterpret_cast<const __m128i*>(reinterpret_cast<const uint8_t*>(row) + (c >> 1)));
  const __m256i q = _mm256_and_si256(
      _mm256_inserti128_si256(_mm256_castsi128_si256(b), _mm_srli_epi16(b, 4), 1),
      _mm256_set1_epi8(15));
  const __m256i b0 = _mm256_shuffle_epi8(t.byte[0], q), b1 = _mm256_shuffle_epi8(t.byte[1], q);
  const __m256i b2 = _mm256_shuffle_epi8(t.byte[2], q), b3 = _mm256_shuffle_epi8(t.byte[3], q);
  const __m256i l01 = _mm256_unpacklo_epi8(b0, b1), h01 = _mm256_unpackhi_epi8(b0, b1);
  const __m256i l23 = _mm256_unpacklo_epi8(b2, b3), h23 = _mm256_unpackhi_epi8(b2, b3);
  f[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(l01, l23));  // bytes 0-3: codes 0-7
  f[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(l01, l23));  // bytes 4-7: codes 8-15
  f[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(h01, h23));  // bytes 8-11: codes 16-23
  f[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(h01, h23));  // bytes 12-15: codes 24-31
}

// The 8 values of codes [c, c + 8) of `row`, before scale and bias; c a multiple of 8 (a whole
// word at 4 bits, half a word at 2 bits, 8 bytes at 8 bits).
// PAIR (4 bits): lanes in pair order (kPairOrder), as the GEMV reads them.
template <int BITS, bool PAIR = false>
inline __m256 avx2_values(const Args& a, const Avx2Table& t, const uint32_t* row, int64_t c) {
  if constexpr (BITS == 4) {
    const __m256i shifts = PAIR ? _mm256_setr_epi32(0, 8, 16, 24, 4, 12, 20, 28)
                                : _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    const __m256i q = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(row[c >> 3])), shifts);
    if (a.identity) return _mm256_cvtepi32_ps(_mm256_and_si256(q, _mm256_set1_epi32(15)));
    const __m256 lo = _mm256_permutevar8x32_ps(t.lo, q), hi = _mm256_permutevar8x32_ps(t.hi, q);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(q, 28)));
  } else if constexpr (BITS == 2) {
    const uint32_t w = row[c >> 4] >> (2 * (c & 15));
    const __m256i q = _mm256_and_si256(
        _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(w)),
                          _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)),
        _mm256_set1_epi32(3));
    return a.identity ? _mm256_cvtepi32_ps(q) : _mm256_permutevar8x32_ps(t.lo, q);
  } else {  // 8 bits
    (void)t;
    const __m128i bytes = _mm_loadl_epi64(
        reinterpret_cast<const __m128i*>(reinterpret_cast<const uint8_t*>(row) + c));
#ifdef __F16C__
    // fp8 as fp16 bit patterns, converted by vcvtph2ps (a gather of the 256-entry table ran 13x
    // slower than the affine path on AMD, where vgatherdps is microcoded)
    if (a.f8 == 1) return _mm256_cvtph_ps(_mm_unpacklo_epi8(_mm_setzero_si128(), bytes));
    if (a.f8 == 2) {
      const __m128i q = _mm_cvtepu8_epi16(bytes);
      __m128i h = _mm_or_si128(_mm_and_si128(_mm_slli_epi16(q, 7), _mm_set1_epi16(0x3F80)),
                               _mm_and_si128(_mm_slli_epi16(q, 8), _mm_set1_epi16(-0x8000)));
      const __m128i nan = _mm_cmpeq_epi16(_mm_and_si128(q, _mm_set1_epi16(0x7F)), _mm_set1_epi16(0x7F));
      h = _mm_or_si128(h, _mm_and_si128(nan, _mm_set1_epi16(0x7E00)));  // exponent 31, mantissa != 0
      return _mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_set1_ps(256.0f));
    }
#endif
    const __m256i q = _mm256_cvtepu8_epi32(bytes);
    return a.identity ? _mm256_cvtepi32_ps(q) : _mm256_i32gather_ps(a.lut, q, 4);
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One weight row against MM (1-4) activation rows: per scale group p = sum(v * x) over the
// group's codes (one FMA per 8 codes and activation row; two partial sums for two FMA chains),
// then acc += s * p and, for affine formats, b * sum(x over the group) from xsum (computed
// once per call): w = v * s + b is never formed. MM is a template parameter so the partial sums
// stay in registers (a run-time count kept them on the stack: a store-to-load chain per FMA).
using SimdTable = Avx2Table;  // built once per chunk of rows (simd_gemv_rows), not per row

template <int BITS, int MM>
void simd_gemv_block(const Args& a, const SimdTable& t, const uint32_t* row, const float* x,
                     int64_t ldx, const float* xsum, int64_t r, float* out) {
  __m256 acc[MM];
  float bsum[MM];
  for (int i = 0; i < MM; ++i) acc[i] = _mm256_setzero_ps(), bsum[i] = 0.0f;
  for (int64_t g = 0; g < a.n_groups; ++g) {
    const int64_t c0 = g * a.group, c1 = std::min(a.k, c0 + a.group);
    // four independent partial sums per activation row: one FMA chain would wait on the FMA's
    // latency (4-5 cycles) every 8 codes, which bounded the loop before the decode did
    __m256 p[4][MM];
    for (int j = 0; j < 4; ++j)
      for (int i = 0; i < MM; ++i) p[j][i] = _mm256_setzero_ps();
    int64_t c = c0;
    for (; c + 32 <= c1; c += 32) {  // 32 codes a step
      __m256 v[4];
      if constexpr (BITS == 4) {
        avx2_values32(t, row, c, v);  // through the byte tables, pair order
      } else {
        for (int j = 0; j < 4; ++j) v[j] = avx2_values<BITS>(a, t, row, c + 8 * j);
      }
      for (int i = 0; i < MM; ++i) {
        const float* xr = x + i * ldx + c;
        for (int j = 0; j < 4; ++j) p[j][i] = _mm256_fmadd_ps(v[j], _mm256_loadu_ps(xr + 8 * j), p[j][i]);
      }
    }
    for (int j = 0; c + 8 <= c1; c += 8, j = (j + 1) & 3) {  // then 8 a step
      const __m256 v0 = avx2_values<BITS, true>(a, t, row, c);
      for (int i = 0; i < MM; ++i)
        p[j][i] = _mm256_fmadd_ps(v0, _mm256_loadu_ps(x + i * ldx + c), p[j][i]);
    }
    const int64_t cb = c;  // codes [cb, c1): fewer than 8, one at a time
    float tail[MM] = {0};
    if (cb < c1) tail_dot<MM>(a, row, x, ldx, cb, c1, tail);
    const float sg = group_scale(a, r, g);
    const __m256 s = _mm256_set1_ps(sg);
    for (int i = 0; i < MM; ++i) {
      const __m256 pg = _mm256_add_ps(_mm256_add_ps(p[0][i], p[1][i]), _mm256_add_ps(p[2][i], p[3][i]));
      acc[i] = _mm256_fmadd_ps(pg, s, acc[i]);
      bsum[i] += sg * tail[i];
    }
    if (a.biases) {
      const float bg = group_bias(a, r, g);
      for (int i = 0; i < MM; ++i) bsum[i] += bg * xsum[i * a.n_groups + g];
    }
  }
  for (int i = 0; i < MM; ++i) out[i] = hsum(acc[i]) + bsum[i];
}

// SIMD GEMV widths here: 2, 4, 8 bits (each group starts on a whole 8-code step: groups are
// multiples of 16 codes, or one per-channel group at 0).
inline bool simd_gemv_ok(const Args& a) {
  return (a.bits == 2 || a.bits == 4 || a.bits == 8) && (a.n_groups == 1 || a.group % 16 == 0);
}
#define MARLIN_SIMD_GEMV 1
#define MARLIN_SIMD_ISA "avx2+fma"

// The activations as the GEMV reads them (see kPairOrder): for 4-bit codes a copy with every
// whole 8-code step permuted (stride k), else x itself.
inline const float* simd_gemv_x(const Args& a, const float* x, int64_t m, int64_t ldx,
                                std::vector<float>& buf, int64_t* ld) {
  if (a.bits != 4) {
    *ld = ldx;
    return x;
  }
  buf.resize(static_cast<size_t>(m * a.k));
  for (int64_t i = 0; i < m; ++i) {
    const float* xi = x + i * ldx;
    float* o = buf.data() + i * a.k;
    int64_t c = 0;
    for (; c + 8 <= a.k; c += 8)
      for (int l = 0; l < 8; ++l) o[c + l] = xi[c + kPairOrder[l]];
    for (; c < a.k; ++c) o[c] = xi[c];
  }
  *ld = a.k;
  return buf.data();
}

#elif defined(MARLIN_NEON)
// NEON (arm64). 16 codes at a time: 8 bytes of 4-bit codes split into low and high nibbles
// (and / shift) and interleaved back into code order (zip) in one uint8x16; a 16-entry float
// table is looked up as four byte tables, one per byte of the float (tbl, then zips assemble
// the bytes into 4 float32x4), or, for affine integers, the codes widened and converted.
// 8-bit codes: 16 bytes widened and converted (affine) or read through the table (fp8).
struct NeonTable {
  uint8x16_t byte[4];  // byte j of lut[q] at lane q
};

inline NeonTable neon_table(const Args& a) {
  uint8_t b[4][16] = {};
  for (int q = 0; q < 16 && q < (1 << a.bits); ++q) {
    uint32_t bits;
    std::memcpy(&bits, a.lut + q, 4);
    for (int j = 0; j < 4; ++j) b[j][q] = static_cast<uint8_t>(bits >> (8 * j));
  }
  return {{vld1q_u8(b[0]), vld1q_u8(b[1]), vld1q_u8(b[2]), vld1q_u8(b[3])}};
}

// uint8 codes q (16 lanes, each < 16 or an identity format's) to 16 floats v[0..3].
inline void neon_lookup(const Args& a, const NeonTable& t, uint8x16_t q, float32x4_t v[4]) {
  if (a.identity) {
    const uint16x8_t lo = vmovl_u8(vget_low_u8(q)), hi = vmovl_u8(vget_high_u8(q));
    v[0] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(lo)));
    v[1] = vcvtq_f32_u32(vmovl_u16(vget_high_u16(lo)));
    v[2] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(hi)));
    v[3] = vcvtq_f32_u32(vmovl_u16(vget_high_u16(hi)));
    return;
  }
  const uint8x16_t b0 = vqtbl1q_u8(t.byte[0], q), b1 = vqtbl1q_u8(t.byte[1], q);
  const uint8x16_t b2 = vqtbl1q_u8(t.byte[2], q), b3 = vqtbl1q_u8(t.byte[3], q);
  // little-endian float = bytes b0 b1 b2 b3: zip bytes into 16-bit halves, halves into words
  const uint16x8_t l01 = vreinterpretq_u16_u8(vzip1q_u8(b0, b1)), h01 = vreinterpretq_u16_u8(vzip2q_u8(b0, b1));
  const uint16x8_t l23 = vreinterpretq_u16_u8(vzip1q_u8(b2, b3)), h23 = vreinterpretq_u16_u8(vzip2q_u8(b2, b3));
  v[0] = vreinterpretq_f32_u16(vzip1q_u16(l01, l23));
  v[1] = vreinterpretq_f32_u16(vzip2q_u16(l01, l23));
  v[2] = vreinterpretq_f32_u16(vzip1q_u16(h01, h23));
  v[3] = vreinterpretq_f32_u16(vzip2q_u16(h01, h23));
}

// The 16 values of codes [c, c + 16) of `row` (c a multiple of 16), before scale and bias.
template <int BITS>
inline void neon_values(const Args& a, const NeonTable& t, const uint32_t* row, int64_t c,
                        float32x4_t v[4]) {
  const uint8_t* bytes = reinterpret_cast<const uint8_t*>(row);
  if constexpr (BITS == 4) {
    const uint8x8_t b = vld1_u8(bytes + (c >> 1));
    const uint8x8x2_t z = vzip_u8(vand_u8(b, vdup_n_u8(15)), vshr_n_u8(b, 4));
    neon_lookup(a, t, vcombine_u8(z.val[0], z.val[1]), v);
  } else {  // 8 bits
    const uint8x16_t q = vld1q_u8(bytes + c);
    if (a.identity) {
      neon_lookup(a, t, q, v);
    } else {
      float f[16];
      for (int i = 0; i < 16; ++i) f[i] = a.lut[bytes[c + i]];
      for (int j = 0; j < 4; ++j) v[j] = vld1q_f32(f + 4 * j);
    }
  }
}

using SimdTable = NeonTable;  // built once per chunk of rows (simd_gemv_rows), not per row

template <int BITS, int MM>
void simd_gemv_block(const Args& a, const SimdTable& t, const uint32_t* row, const float* x,
                     int64_t ldx, const float* xsum, int64_t r, float* out) {
  float32x4_t acc[MM];
  float bsum[MM];
  for (int i = 0; i < MM; ++i) acc[i] = vdupq_n_f32(0.0f), bsum[i] = 0.0f;
  for (int64_t g = 0; g < a.n_groups; ++g) {
    const int64_t c0 = g * a.group, c1 = std::min(a.k, c0 + a.group);
    const int64_t cb = c0 + (c1 - c0) / 16 * 16;
    float32x4_t p0[MM], p1[MM];
    for (int i = 0; i < MM; ++i) p0[i] = p1[i] = vdupq_n_f32(0.0f);
    for (int64_t c = c0; c < cb; c += 16) {
      float32x4_t v[4];
      neon_values<BITS>(a, t, row, c, v);
      for (int i = 0; i < MM; ++i) {
        const float* xr = x + i * ldx + c;
        p0[i] = vfmaq_f32(p0[i], v[0], vld1q_f32(xr));
        p1[i] = vfmaq_f32(p1[i], v[1], vld1q_f32(xr + 4));
        p0[i] = vfmaq_f32(p0[i], v[2], vld1q_f32(xr + 8));
        p1[i] = vfmaq_f32(p1[i], v[3], vld1q_f32(xr + 12));
      }
    }
    float tail[MM] = {0};
    if (cb < c1) tail_dot<MM>(a, row, x, ldx, cb, c1, tail);
    const float sg = group_scale(a, r, g);
    for (int i = 0; i < MM; ++i) {
      acc[i] = vfmaq_n_f32(acc[i], vaddq_f32(p0[i], p1[i]), sg);
      bsum[i] += sg * tail[i];
    }
    if (a.biases) {
      const float bg = group_bias(a, r, g);
      for (int i = 0; i < MM; ++i) bsum[i] += bg * xsum[i * a.n_groups + g];
    }
  }
  for (int i = 0; i < MM; ++i) out[i] = vaddvq_f32(acc[i]) + bsum[i];
}

inline bool simd_gemv_ok(const Args& a) {
  return (a.bits == 4 || a.bits == 8) && (a.n_groups == 1 || a.group % 16 == 0);
}
#define MARLIN_SIMD_GEMV 1
#define MARLIN_SIMD_ISA "neon"

// The activations as the GEMV reads them: in order (NEON decodes codes in order).
inline const float* simd_gemv_x(const Args&, const float* x, int64_t, int64_t ldx,
                                std::vector<float>&, int64_t* ld) {
  *ld = ldx;
  return x;
}
#endif  // MARLIN_AVX2 / MARLIN_NEON

#ifdef MARLIN_SIMD_GEMV
// Weight rows [n0, n1) against all m activation rows, up to 4 activation rows sharing each
// decode.
template <int BITS>
void simd_gemv_rows(const Args& a, const float* x, int64_t m, int64_t ldx, const float* xsum,
                    const float* bias, float* y, int64_t ldy, int64_t n0, int64_t n1) {
#ifdef MARLIN_AVX2
  const SimdTable t = avx2_table(a);
#else
  const SimdTable t = neon_table(a);
#endif
  for (int64_t r = n0; r < n1; ++r) {
    const uint32_t* row = a.w + r * a.kw;
    for (int64_t i0 = 0; i0 < m; i0 += 4) {
      float out[4];
      const float* xs = x + i0 * ldx;
      const float* ss = xsum + i0 * a.n_groups;
      switch (std::min<int64_t>(4, m - i0)) {
        case 1: simd_gemv_block<BITS, 1>(a, t, row, xs, ldx, ss, r, out); break;
        case 2: simd_gemv_block<BITS, 2>(a, t, row, xs, ldx, ss, r, out); break;
        case 3: simd_gemv_block<BITS, 3>(a, t, row, xs, ldx, ss, r, out); break;
        default: simd_gemv_block<BITS, 4>(a, t, row, xs, ldx, ss, r, out); break;
      }
      for (int64_t i = 0; i < std::min<int64_t>(4, m - i0); ++i)
        y[(i0 + i) * ldy + r] = out[i] + (bias ? bias[r] : 0.0f);
    }
  }
}
#else
#define MARLIN_SIMD_ISA "portable"
#endif

// A persistent pool of sleeping workers that share each call's chunks with the caller.
//
// Threads are started once (thread creation is expensive, very much so under sandboxes such as
// gVisor) and woken per call through a condition variable; idle workers sleep (no spinning that
// would take cores from torch's own threads between calls). A call's chunks are handed out by
// one atomic counter that the caller takes from too, and the caller waits only for chunks a
// worker has actually started: a worker that the OS has not run yet when the counter runs out
// finds nothing left and goes back to sleep. A fork-join split (the caller waiting for every
// worker to run its fixed share, as an OpenMP `parallel for` does) cost a whole scheduler
// round when the machine was busy: on the 2-core CI machine at load 9, a 2-thread OpenMP
// region around a 0.02 ms GEMV took 20-24 ms (the caller spun at the join while the worker
// waited for a core behind other processes), and 0.05 ms with passive waiting.
class Pool {
 public:
  static Pool& get() {
    static Pool* pool = new Pool;  // never destroyed: its detached workers outlive main()
    return *pool;
  }

  // body(chunk) for every chunk in [0, chunks), on the calling thread and up to `helpers`
  // workers; returns when all are done.
  void run(int helpers, int64_t chunks, const std::function<void(int64_t)>& body) {
    if (helpers <= 0 || chunks <= 1) {
      for (int64_t c = 0; c < chunks; ++c) body(c);
      return;
    }
    std::lock_guard<std::mutex> call_lock(call_mu_);  // one parallel call at a time
    {
      std::lock_guard<std::mutex> lk(mu_);
      grow(helpers);
      job_ = &body;
      chunks_ = chunks;
      next_.store(0, std::memory_order_relaxed);
      wanted_ = helpers;
      ++generation_;
    }
    cv_.notify_all();
    work(body, chunks);
    std::unique_lock<std::mutex> lk(mu_);
    wanted_ = 0;  // a worker waking from now on does not join
    done_cv_.wait(lk, [&] { return active_ == 0; });
    job_ = nullptr;
  }

 private:
  void work(const std::function<void(int64_t)>& body, int64_t chunks) {
    for (int64_t c; (c = next_.fetch_add(1, std::memory_order_relaxed)) < chunks;) body(c);
  }

  void grow(int want) {  // under mu_
    for (; workers_ < want; ++workers_) std::thread([this] { loop(); }).detach();
  }

  void loop() {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
      cv_.wait(lk, [&] { return generation_ != seen; });
      seen = generation_;
      // join only while the caller has not started waiting (active_ is then counted before
      // the caller can see 0) and only as many workers as the call asked for
      if (wanted_ <= 0 || job_ == nullptr) continue;
      --wanted_;
      ++active_;
      const std::function<void(int64_t)>* job = job_;
      const int64_t chunks = chunks_;
      lk.unlock();
      work(*job, chunks);
      lk.lock();
      if (--active_ == 0) done_cv_.notify_one();
    }
  }

  std::mutex call_mu_, mu_;
  std::condition_variable cv_, done_cv_;
  int workers_ = 0, wanted_ = 0, active_ = 0;
  const std::function<void(int64_t)>* job_ = nullptr;
  int64_t chunks_ = 0;
  std::atomic<int64_t> next_{0};
  uint64_t generation_ = 0;
};

// body(c) for every chunk c in [0, chunks) on up to `threads` threads: with `omp` (and a build
// with OpenMP, on torch's own libgomp: ops/cpu) an OpenMP loop, so torch's threads, which spin
// for a while after each torch op (libgomp's default GOMP_SPINCOUNT: ~300k pauses, milliseconds),
// take the chunks at once instead of competing for the cores with a second set of threads (our
// own workers woken while torch's spun: 0.29-0.67x dense at M = 64, and GEMV times spread 2-3x,
// on a 16-core Xeon); otherwise the Pool, whose caller never waits for a worker that has not
// started (an OpenMP join waits for every thread: ms per call when a thread waits for a core on
// a loaded machine, see Pool).
template <typename F>
void parallel_chunks(int64_t chunks, int threads, bool omp, F&& body) {
  threads = static_cast<int>(std::min<int64_t>(threads, chunks));
  if (threads <= 1) {
    for (int64_t c = 0; c < chunks; ++c) body(c);
    return;
  }
#ifdef _OPENMP
  if (omp) {
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t c = 0; c < chunks; ++c) body(c);
    return;
  }
#else
  (void)omp;
#endif
  const std::function<void(int64_t)> task = [&](int64_t c) { body(c); };
  Pool::get().run(threads - 1, chunks, task);
}

// body(r0, r1) over [0, n) in chunks (about 8 a thread, at least 16 rows each, so that a late
// or preempted thread leaves little for the others to wait on).
template <typename F>
void parallel_rows(int64_t n, int threads, bool omp, F&& body) {
  if (threads <= 1 || n <= 16) {
    if (n > 0) body(int64_t{0}, n);
    return;
  }
  const int64_t per = std::max<int64_t>(16, (n + 8 * threads - 1) / (8 * threads));
  const int64_t chunks = (n + per - 1) / per;
  parallel_chunks(chunks, threads, omp, [&](int64_t c) {
    body(c * per, std::min<int64_t>(n, c * per + per));
  });
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

// Weight rows [r0, r1), codes [k0, k1), decoded and scaled (w = lut[q] * s + b) into float32
// rows of stride ldo: out[(r - r0) * ldo + (c - k0)]. k0 a multiple of 32 codes (a whole word
// at every width, a whole SIMD step). Group by group: SIMD (8 codes a step on AVX2, 16 on
// NEON) where the group's codes start on a step, the rest (3 bits, unaligned tails) through
// the byte-table / bit-window decoder.
void decode_panel(const Args& a, int64_t r0, int64_t r1, int64_t k0, int64_t k1, float* out,
                  int64_t ldo) {
#ifdef MARLIN_AVX2
  const Avx2Table t = avx2_table(a);
#elif defined(MARLIN_NEON)
  const NeonTable t = neon_table(a);
#endif
#ifdef MARLIN_SIMD_GEMV
  const bool simd = simd_gemv_ok(a);
#endif
  for (int64_t r = r0; r < r1; ++r) {
    const uint32_t* row = a.w + r * a.kw;
    float* o = out + (r - r0) * ldo - k0;  // o[c] for c in [k0, k1)
    for (int64_t g = k0 / a.group; g < a.n_groups && g * a.group < k1; ++g) {
      const int64_t c0 = std::max(k0, g * a.group), c1 = std::min({k1, a.k, (g + 1) * a.group});
      const float sg = group_scale(a, r, g), bg = group_bias(a, r, g);
      int64_t c = c0;
#ifdef MARLIN_AVX2
      if (simd) {
        const __m256 s = _mm256_set1_ps(sg), b = _mm256_set1_ps(bg);
        if (a.bits == 4) {
          for (; c + 8 <= c1; c += 8)
            _mm256_storeu_ps(o + c, _mm256_fmadd_ps(avx2_values<4>(a, t, row, c), s, b));
        } else if (a.bits == 2) {
          for (; c + 8 <= c1; c += 8)
            _mm256_storeu_ps(o + c, _mm256_fmadd_ps(avx2_values<2>(a, t, row, c), s, b));
        } else {
          for (; c + 8 <= c1; c += 8)
            _mm256_storeu_ps(o + c, _mm256_fmadd_ps(avx2_values<8>(a, t, row, c), s, b));
        }
      }
#elif defined(MARLIN_NEON)
      if (simd) {
        for (; c + 16 <= c1; c += 16) {
          float32x4_t v[4];
          if (a.bits == 4) neon_values<4>(a, t, row, c, v);
          else neon_values<8>(a, t, row, c, v);
          for (int j = 0; j < 4; ++j)
            vst1q_f32(o + c + 4 * j, vfmaq_n_f32(vdupq_n_f32(bg), v[j], sg));
        }
      }
#endif
      if (c < c1) {
        decode(a, row, c, c1 - c, o + c);
        apply_scale(o + c, c1 - c, sg, bg);
      }
    }
  }
}

// ---- Prefill (M > GEMV_MAX_M): decode a panel of weight rows in cache, multiply it at once ----
//
// y[m, n] = sum_k x[m, k] * W_hat[n, k]. Work units are NB weight rows x up to MC activation
// rows; a thread takes a unit and, K-block by K-block (KC codes), decodes the unit's NB x KC
// weights into a float32 buffer of its own (NB * KC * 4 bytes: 48 KB at 48 x 256, in L1/L2)
// and multiplies it into the unit's C^T[NB][MC] (a second buffer of its own) with a
// register-blocked microkernel; at the end it writes its tile of y, plus the layer bias. So a
// weight is decoded once per MC activation rows (about one instruction per 8 weights against
// MC / 8 FMAs per weight on AVX2), the decoded weight never leaves the core's cache, and the
// whole weight is never materialized (the previous path decoded 32 MB tiles for torch.mm:
// 0.44-0.83x dense fp32 at M = 64, written to and read back from memory).
//
// Vectors run along M: the microkernel holds R (<= 6) weight rows x V vectors of activation
// rows in registers; per code k it loads V vectors of x^T[k] and broadcasts R weights. x is
// packed once per call (pack_x) into blocks of BW = kMaxV * L activation rows, each block
// [K][width] (width BW; the last block's rows rounded up to L, zero rows added), so each
// microkernel reads one contiguous stream. GCC / Clang vector extensions (one source for
// AVX2, AVX-512 and NEON; FMA through -ffp-contract=fast in the build).
#if defined(MARLIN_VEC_BYTES)  // tests: another width's code on this host (correctness only)
constexpr int kVecBytes = MARLIN_VEC_BYTES, kMaxV = 4;
#elif defined(__AVX512F__)
constexpr int kVecBytes = 64, kMaxV = 4;  // 32 registers: 6 x 4 accumulators, 4 x, 1 weight
#elif defined(__AVX__)
constexpr int kVecBytes = 32, kMaxV = 2;  // 16 registers: 6 x 2 accumulators, 2 x, 1 weight
#elif defined(__aarch64__)
constexpr int kVecBytes = 16, kMaxV = 4;  // 32 registers
#else
constexpr int kVecBytes = 16, kMaxV = 2;
#endif
typedef float VecF __attribute__((vector_size(kVecBytes)));
constexpr int kLanes = kVecBytes / 4;
constexpr int kBlockM = kMaxV * kLanes;  // activation rows per packed block (BW)
constexpr int kMicroRows = 6;            // weight rows per microkernel (R)

// c[r][v * L ...] (+)= sum_k w[r * ldw + k] * xb[k * V * L + v * L ...] for r < R, v < V:
// R x V accumulators in registers over kc codes (a run-time R or V spilled them to the stack).
template <int R, int V>
void micro_tile(const float* w, int64_t ldw, const float* xb, int64_t kc, float* c, int64_t ldc,
                bool accumulate) {
  VecF acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = VecF{};
  for (int64_t k = 0; k < kc; ++k) {
    VecF xv[V];
    for (int v = 0; v < V; ++v) std::memcpy(&xv[v], xb + (k * V + v) * kLanes, sizeof(VecF));
    for (int r = 0; r < R; ++r) {
      const float s = w[r * ldw + k];
      for (int v = 0; v < V; ++v) acc[r][v] += xv[v] * s;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) {
      float* p = c + r * ldc + v * kLanes;
      VecF o = acc[r][v];
      if (accumulate) {
        VecF old;
        std::memcpy(&old, p, sizeof(VecF));
        o += old;
      }
      std::memcpy(p, &o, sizeof(VecF));
    }
}

template <int V>
void micro_rows(int rows, const float* w, int64_t ldw, const float* xb, int64_t kc, float* c,
                int64_t ldc, bool accumulate) {
  switch (rows) {
    case 1: micro_tile<1, V>(w, ldw, xb, kc, c, ldc, accumulate); break;
    case 2: micro_tile<2, V>(w, ldw, xb, kc, c, ldc, accumulate); break;
    case 3: micro_tile<3, V>(w, ldw, xb, kc, c, ldc, accumulate); break;
    case 4: micro_tile<4, V>(w, ldw, xb, kc, c, ldc, accumulate); break;
    case 5: micro_tile<5, V>(w, ldw, xb, kc, c, ldc, accumulate); break;
    default: micro_tile<6, V>(w, ldw, xb, kc, c, ldc, accumulate); break;
  }
}

void micro(int rows, int vecs, const float* w, int64_t ldw, const float* xb, int64_t kc, float* c,
           int64_t ldc, bool accumulate) {
  switch (vecs) {
    case 1: micro_rows<1>(rows, w, ldw, xb, kc, c, ldc, accumulate); break;
    case 2: micro_rows<2>(rows, w, ldw, xb, kc, c, ldc, accumulate); break;
    case 3: if constexpr (kMaxV >= 3) micro_rows<3>(rows, w, ldw, xb, kc, c, ldc, accumulate); break;
    default: if constexpr (kMaxV >= 4) micro_rows<4>(rows, w, ldw, xb, kc, c, ldc, accumulate); break;
  }
}

// Packed x: block b holds activation rows [b * BW, b * BW + width) as [K][width] at b * BW * K.
inline int64_t block_width(int64_t m, int64_t b) {
  const int64_t rows = std::min<int64_t>(kBlockM, m - b * kBlockM);
  return (rows + kLanes - 1) / kLanes * kLanes;
}

void prefill(const Args& a, const float* x, int64_t m, int64_t ldx, const float* bias, float* y,
             int64_t ldy, int64_t nb, int64_t kc, int64_t mc, int threads, bool omp) {
  const int64_t k = a.k, n = a.n;
  nb = std::max<int64_t>(1, nb);
  kc = std::max<int64_t>(32, kc / 32 * 32);  // K blocks start on a word (decode_panel)
  mc = std::max<int64_t>(kBlockM, mc / kBlockM * kBlockM);  // m chunks start on a block
  const int64_t blocks = (m + kBlockM - 1) / kBlockM;
  // not zero-filled (a std::vector's memset of M x K floats on one thread cost ~2 ms at M = 256,
  // K = 14336): pack_x writes every element a microkernel reads, padding rows included
  std::unique_ptr<float[]> xbuf(new float[static_cast<size_t>(blocks * kBlockM * k)]);
  float* const xp_data = xbuf.get();
  // pack_x: units of one block x 256 codes
  const int64_t kparts = (k + 255) / 256;
  parallel_chunks(blocks * kparts, threads, omp, [&](int64_t u) {
    const int64_t b = u / kparts, c0 = (u % kparts) * 256, c1 = std::min(k, c0 + 256);
    const int64_t wdt = block_width(m, b), rows = std::min<int64_t>(kBlockM, m - b * kBlockM);
    float* dst = xp_data + b * kBlockM * k;
    for (int64_t j = 0; j < wdt; ++j) {
      const float* src = x + (b * kBlockM + j) * ldx;
      if (j < rows) {
        for (int64_t c = c0; c < c1; ++c) dst[c * wdt + j] = src[c];
      } else {
        for (int64_t c = c0; c < c1; ++c) dst[c * wdt + j] = 0.0f;
      }
    }
  });
  const int64_t n_units = (n + nb - 1) / nb, m_units = (m + mc - 1) / mc;
  parallel_chunks(n_units * m_units, threads, omp, [&](int64_t u) {
    thread_local std::vector<float> wbuf, cbuf;
    const int64_t n0 = (u % n_units) * nb, rows = std::min(nb, n - n0);
    const int64_t mb0 = (u / n_units) * mc, mlen = std::min(mc, m - mb0);
    const int64_t ldc = (mlen + kLanes - 1) / kLanes * kLanes;
    wbuf.resize(static_cast<size_t>(nb * kc));
    cbuf.resize(static_cast<size_t>(nb * ldc));
    for (int64_t k0 = 0; k0 < k; k0 += kc) {
      const int64_t k1 = std::min(k, k0 + kc);
      decode_panel(a, n0, n0 + rows, k0, k1, wbuf.data(), kc);
      for (int64_t mb = mb0; mb < mb0 + mlen; mb += kBlockM) {
        const int64_t b = mb / kBlockM, wdt = block_width(m, b);
        const float* xb = xp_data + b * kBlockM * k + k0 * wdt;
        for (int64_t r = 0; r < rows; r += kMicroRows)
          micro(static_cast<int>(std::min<int64_t>(kMicroRows, rows - r)),
                static_cast<int>(wdt / kLanes), wbuf.data() + r * kc, kc, xb, k1 - k0,
                cbuf.data() + r * ldc + (mb - mb0), ldc, k0 > 0);
      }
    }
    for (int64_t j = 0; j < mlen; ++j) {
      float* yr = y + (mb0 + j) * ldy + n0;
      for (int64_t r = 0; r < rows; ++r) yr[r] = cbuf[r * ldc + j] + (bias ? bias[n0 + r] : 0.0f);
    }
  });
}

}  // namespace

extern "C" {

int marlin_cpu_abi_version() { return 4; }

int marlin_cpu_openmp() {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

// The GEMV's vector path in this build: "avx2+fma", "neon" or "portable".
const char* marlin_cpu_isa() { return MARLIN_SIMD_ISA; }

// Floats per vector of the prefill microkernel (8 AVX2, 16 AVX-512, 4 NEON).
int marlin_cpu_prefill_lanes() { return kLanes; }

// y[m, n] = sum_k x[m, k] * W_hat[n, k] (+ bias[n]); x float32 [M, K] (row stride ldx),
// y float32 [M, N] (row stride ldy). Rows of W are shared between up to `threads` threads
// (omp: on the OpenMP pool where the build has one, see parallel_chunks).
void marlin_cpu_gemv(const float* x, int64_t m, int64_t ldx, const uint32_t* w, int64_t n,
                     int64_t kw, int64_t k, const void* scales, const void* biases, int scale_kind,
                     int64_t n_groups, int64_t group, int bits, const float* lut, const float* bias,
                     float* y, int64_t ldy, int threads, int omp) {
  const Args a = make_args(w, n, kw, k, scales, biases, scale_kind, n_groups, group, bits, lut);
#ifdef MARLIN_SIMD_GEMV
  if (simd_gemv_ok(a)) {
    std::vector<float> xsum(static_cast<size_t>(m * n_groups), 0.0f);  // sum(x) per group
    if (biases)
      for (int64_t i = 0; i < m; ++i)
        for (int64_t g = 0; g < n_groups; ++g) {
          float s = 0;
          for (int64_t c = g * group; c < std::min(k, (g + 1) * group); ++c) s += x[i * ldx + c];
          xsum[i * n_groups + g] = s;
        }
    std::vector<float> xbuf;
    int64_t lx = ldx;
    const float* xs = simd_gemv_x(a, x, m, ldx, xbuf, &lx);
    parallel_rows(n, threads, omp != 0, [&](int64_t n0, int64_t n1) {
      if (bits == 4) simd_gemv_rows<4>(a, xs, m, lx, xsum.data(), bias, y, ldy, n0, n1);
#ifdef MARLIN_AVX2
      else if (bits == 2) simd_gemv_rows<2>(a, xs, m, lx, xsum.data(), bias, y, ldy, n0, n1);
#endif
      else simd_gemv_rows<8>(a, xs, m, lx, xsum.data(), bias, y, ldy, n0, n1);
    });
    return;
  }
#endif
  parallel_rows(n, threads, omp != 0, [&](int64_t n0, int64_t n1) {
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

// The same product for many activation rows (prefill): panels of NB weight rows x KC codes
// decoded in cache and multiplied by a microkernel, MC activation rows at a time (see
// prefill above; the Python side picks nb, kc, mc). kc is rounded down to a multiple of 32.
void marlin_cpu_gemm(const float* x, int64_t m, int64_t ldx, const uint32_t* w, int64_t n,
                     int64_t kw, int64_t k, const void* scales, const void* biases, int scale_kind,
                     int64_t n_groups, int64_t group, int bits, const float* lut, const float* bias,
                     float* y, int64_t ldy, int64_t nb, int64_t kc, int64_t mc, int threads,
                     int omp) {
  const Args a = make_args(w, n, kw, k, scales, biases, scale_kind, n_groups, group, bits, lut);
  if (m > 0 && n > 0) prefill(a, x, m, ldx, bias, y, ldy, nb, kc, mc, threads, omp != 0);
}

// out[r - n0, :] = W_hat[r, :] for r in [n0, n1): float32 rows of length K (row stride ldo).
void marlin_cpu_dequant(const uint32_t* w, int64_t n, int64_t kw, int64_t k, const void* scales,
                        const void* biases, int scale_kind, int64_t n_groups, int64_t group, int bits,
                        const float* lut, int64_t n0, int64_t n1, float* out, int64_t ldo,
                        int threads) {
  const Args a = make_args(w, n, kw, k, scales, biases, scale_kind, n_groups, group, bits, lut);
  parallel_rows(n1 - n0, threads, true, [&](int64_t r0, int64_t r1) {
    decode_panel(a, n0 + r0, n0 + r1, 0, k, out + r0 * ldo, ldo);
  });
}

}  // extern "C"
