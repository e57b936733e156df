// Stand-alone check of metal_marlin_torch/ops/cpu/gemm_cpu.cpp against a scalar reference, with
// no torch: tests/ops/test_gemm_cpu_isa.py compiles it for the host and, where a cross compiler
// and qemu-user are installed, for arm64 (the NEON path) and runs it there.
//
// Random packed rows (any width 2/3/4/8), a 16-entry (or 256-entry) value table that is either
// the identity (affine integers) or arbitrary floats (NF4-like), fp32 / fp16 / bf16 scales, with
// and without affine biases and a layer bias, group sizes 16-128 and per-channel with K that is
// not a multiple of 16, 1-8 activation rows, 1-3 threads; marlin_cpu_gemv, marlin_cpu_gemm
// (prefill: 9-70 rows, panel sizes that leave partial blocks everywhere) and
// marlin_cpu_dequant are compared with w = lut[q] * s + b computed one code at a time. Prints one
// line per failure and "ok N" at the end; exit status 1 on any failure.

#include "../../metal_marlin_torch/ops/cpu/gemm_cpu.cpp"

#include <cstdio>
#include <random>

namespace {

uint16_t float_to_half(float f) {  // round to nearest even, normal range only (test scales)
  uint32_t b;
  std::memcpy(&b, &f, 4);
  const uint32_t sign = (b >> 16) & 0x8000;
  const int32_t exp = static_cast<int32_t>((b >> 23) & 0xff) - 127 + 15;
  uint32_t man = b & 0x7fffff;
  uint32_t h = sign | static_cast<uint32_t>(exp) << 10 | man >> 13;
  const uint32_t rest = man & 0x1fff;
  if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) ++h;
  return static_cast<uint16_t>(h);
}

struct Case {
  int bits;
  int64_t n, k, group;  // group == k: per-channel
  int kind;             // 0 f32, 1 f16, 2 bf16 scales
  bool identity, affine, layer_bias;
  int f8 = 0;  // 8 bits: 1 an e5m2 table, 2 e4m3 (the kernel converts these by F16C on AVX2)
};

int failures = 0, checks = 0;

void run(const Case& c, std::mt19937& rng) {
  const int64_t kw = (c.k * c.bits + 31) / 32, ng = (c.k + c.group - 1) / c.group;
  std::vector<uint32_t> w(static_cast<size_t>(c.n * kw));
  for (auto& v : w) v = c.f8 ? rng() & 0x3b3b3b3bu : rng();  // fp8: no inf / NaN codes
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> lut(static_cast<size_t>(1) << c.bits);
  for (size_t q = 0; q < lut.size(); ++q) {
    lut[q] = c.identity ? static_cast<float>(q) : u(rng);
    if (c.f8) {  // the format's values (NaN codes NaN), independent of the kernel's decode
      const uint32_t e = c.f8 == 1 ? (q >> 2) & 31 : (q >> 3) & 15, m = c.f8 == 1 ? q & 3 : q & 7;
      const int bias = c.f8 == 1 ? 15 : 7, mb = c.f8 == 1 ? 2 : 3;
      const double mag = e ? std::ldexp(1.0 + m / double(1 << mb), int(e) - bias)
                           : std::ldexp(m / double(1 << mb), 1 - bias);
      lut[q] = static_cast<float>((q & 0x80) ? -mag : mag);
      if ((c.f8 == 1 && e == 31) || (c.f8 == 2 && (q & 0x7F) == 0x7F)) lut[q] = NAN;
    }
  }
  // scales / biases stored in the case's kind; the reference reads them back through scale_at
  std::vector<uint16_t> s16(static_cast<size_t>(c.n * ng)), b16(s16.size());
  std::vector<float> s32(s16.size()), b32(s16.size());
  for (size_t i = 0; i < s32.size(); ++i) {
    s32[i] = 0.01f + 0.1f * std::fabs(u(rng));
    b32[i] = 0.05f * u(rng);
    if (c.kind == 1) s16[i] = float_to_half(s32[i]), b16[i] = float_to_half(b32[i]);
    if (c.kind == 2) {
      uint32_t bs, bb;
      std::memcpy(&bs, &s32[i], 4);
      std::memcpy(&bb, &b32[i], 4);
      s16[i] = static_cast<uint16_t>(bs >> 16), b16[i] = static_cast<uint16_t>(bb >> 16);
    }
  }
  const void* sp = c.kind == 0 ? static_cast<const void*>(s32.data()) : s16.data();
  const void* bp = !c.affine ? nullptr : c.kind == 0 ? static_cast<const void*>(b32.data()) : b16.data();
  std::vector<float> bias(static_cast<size_t>(c.n));
  for (auto& v : bias) v = u(rng);
  // reference W_hat, one code at a time
  std::vector<double> wr(static_cast<size_t>(c.n * c.k));
  for (int64_t r = 0; r < c.n; ++r)
    for (int64_t kk = 0; kk < c.k; ++kk) {
      const int64_t bit = kk * c.bits;
      uint64_t v = w[r * kw + (bit >> 5)];
      if ((bit >> 5) + 1 < kw) v |= static_cast<uint64_t>(w[r * kw + (bit >> 5) + 1]) << 32;
      const uint32_t q = static_cast<uint32_t>(v >> (bit & 31)) & ((1u << c.bits) - 1);
      const int64_t g = r * ng + kk / c.group;
      const double s = scale_at(sp, c.kind, g), b = bp ? scale_at(bp, c.kind, g) : 0.0;
      wr[r * c.k + kk] = lut[q] * s + b;
    }
  for (int m : {1, 3, 5, 8})
    for (int threads : {1, 3}) {
      std::vector<float> x(static_cast<size_t>(m * c.k)), y(static_cast<size_t>(m * c.n), -7.0f);
      for (auto& v : x) v = u(rng);
      marlin_cpu_gemv(x.data(), m, c.k, w.data(), c.n, kw, c.k, sp, bp, c.kind, ng, c.group,
                      c.bits, lut.data(), c.layer_bias ? bias.data() : nullptr, y.data(), c.n, threads,
                      threads == 3);  // 3 threads: the OpenMP pool where built, else the own one
      for (int i = 0; i < m; ++i)
        for (int64_t r = 0; r < c.n; ++r) {
          double ref = c.layer_bias ? bias[r] : 0.0, mag = std::fabs(ref);
          for (int64_t kk = 0; kk < c.k; ++kk) {
            ref += wr[r * c.k + kk] * x[i * c.k + kk];
            mag += std::fabs(wr[r * c.k + kk] * x[i * c.k + kk]);
          }
          ++checks;
          if (std::fabs(y[i * c.n + r] - ref) > 1e-5 * mag + 1e-6) {
            if (++failures < 20)
              std::printf("gemv bits=%d k=%lld group=%lld kind=%d id=%d affine=%d m=%d threads=%d "
                          "row %lld: %g != %g\n", c.bits, (long long)c.k, (long long)c.group,
                          c.kind, c.identity, c.affine, m, threads, (long long)r,
                          y[i * c.n + r], ref);
          }
        }
    }
  // prefill: panels of nb rows x kc codes, mc activation rows a unit; nb 7 and 6 leave partial
  // microkernel row blocks and a partial last panel, kc 32 / 64 K blocks inside a group and a
  // partial last K block, m past one packed block of activation rows (16 or 64) with a tail
  const int64_t nbs[] = {7, 6, 48}, kcs[] = {32, 64, 512};
  for (int m : {9, 20, 70})
    for (int v = 0; v < 3; ++v) {
      const int threads = v == 1 ? 1 : 3;
      const int64_t mc = v == 2 ? 2 * kBlockM : kBlockM;
      std::vector<float> x(static_cast<size_t>(m * c.k)), y(static_cast<size_t>(m * c.n), -7.0f);
      for (auto& e : x) e = u(rng);
      marlin_cpu_gemm(x.data(), m, c.k, w.data(), c.n, kw, c.k, sp, bp, c.kind, ng, c.group,
                      c.bits, lut.data(), c.layer_bias ? bias.data() : nullptr, y.data(), c.n,
                      nbs[v], kcs[v], mc, threads, v != 1);
      for (int i = 0; i < m; ++i)
        for (int64_t r = 0; r < c.n; ++r) {
          double ref = c.layer_bias ? bias[r] : 0.0, mag = std::fabs(ref);
          for (int64_t kk = 0; kk < c.k; ++kk) {
            ref += wr[r * c.k + kk] * x[i * c.k + kk];
            mag += std::fabs(wr[r * c.k + kk] * x[i * c.k + kk]);
          }
          ++checks;
          if (std::fabs(y[i * c.n + r] - ref) > 1e-5 * mag + 1e-6 && ++failures < 20)
            std::printf("gemm bits=%d k=%lld group=%lld kind=%d m=%d nb=%lld kc=%lld row %lld "
                        "act %d: %g != %g\n", c.bits, (long long)c.k, (long long)c.group, c.kind,
                        m, (long long)nbs[v], (long long)kcs[v], (long long)r, i,
                        y[i * c.n + r], ref);
        }
    }
  std::vector<float> d(static_cast<size_t>(c.n * c.k), -7.0f);
  marlin_cpu_dequant(w.data(), c.n, kw, c.k, sp, bp, c.kind, ng, c.group, c.bits, lut.data(), 0,
                     c.n, d.data(), c.k, 2);
  for (size_t i = 0; i < d.size(); ++i) {
    ++checks;
    if (std::fabs(d[i] - wr[i]) > 1e-6 * (std::fabs(wr[i]) + 1e-3) && ++failures < 20)
      std::printf("dequant bits=%d k=%lld group=%lld at %zu: %g != %g\n", c.bits, (long long)c.k,
                  (long long)c.group, i, d[i], wr[i]);
  }
}

}  // namespace

int main() {
  std::printf("isa %s lanes %d\n", marlin_cpu_isa(), marlin_cpu_prefill_lanes());
  std::mt19937 rng(1234);
  for (int bits : {2, 3, 4, 8})
    for (auto kg : {std::pair<int64_t, int64_t>{256, 16}, {256, 32}, {384, 128}, {100, 100},
                    {37, 37}, {16, 16}, {144, 144}})
      for (int kind : {0, 1, 2})
        for (bool identity : {true, false}) {
          if (kg.second == 16 && bits == 8 && kind) continue;  // keep the run short
          run({bits, 53, kg.first, kg.second, kind, identity, identity, kind == 1}, rng);
        }
  for (int f8 : {1, 2})
    for (auto kg : {std::pair<int64_t, int64_t>{256, 32}, {100, 100}})
      run({8, 53, kg.first, kg.second, 1, false, false, true, f8}, rng);
  std::printf("%s %d checks, %d failures\n", failures ? "FAILED" : "ok", checks, failures);
  return failures ? 1 : 0;
}
