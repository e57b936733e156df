// marlin::kv_* host code (quantized KV cache, docs/KV_CACHE.md §3): checks mirroring the torch
// ops' errors (metal_marlin_torch/ops/kv.py), outputs, kernel names and grids for
// shaders/kv.h. Argument errors are ValueErrors in Python (TORCH_CHECK_VALUE), as the torch
// ops raise.
#include <ATen/ops/empty.h>

#include <cmath>

#include "ops/common.h"
#include "ops/ops.h"
#include "shaders/kv_args.h"

namespace marlin {
namespace {

constexpr int64_t kBits[] = {4, 5, 6, 8};
constexpr int64_t kNormBlock = 256;                           // one norm per 256 rotated coordinates
constexpr int64_t kMinKernelDim = 32, kMaxKernelDim = 512;    // instantiate_kv_head_dims
constexpr uint32_t kMaxThreads = 256;                         // KV_MAX_THREADS
constexpr uint32_t kAttnThreads = 4 * 32;                     // KV_ATTN_SIMDGROUPS simdgroups
constexpr int64_t kAttnHeads = 8;                             // KV_ATTN_HEADS: query heads per threadgroup
constexpr int64_t kAttnChunk = 256;  // positions per attention threadgroup; not tuned (no Apple GPU here)

void check_bits(const char* op, int64_t bits) {
  bool ok = false;
  for (int64_t b : kBits) ok |= b == bits;
  TORCH_CHECK_VALUE(ok, op, ": bits must be one of (4, 5, 6, 8), got ", bits);
}

bool is_pow2(int64_t v) { return v >= 2 && (v & (v - 1)) == 0; }

struct Cache {
  int64_t rows, capacity, head_dim, norms_per_pos;
};

// Validate one cache's tensors (packed, norms, codebook) as ops/kv.py check_cache does.
Cache check_cache(const char* op, const at::Tensor& packed, const at::Tensor& norms, const at::Tensor& codebook,
                  int64_t bits) {
  check_bits(op, bits);
  TORCH_CHECK_VALUE(packed.scalar_type() == at::kByte && packed.dim() == 3, op, ": packed must be uint8 [H, C, D",
                    bits == 4 ? "/2" : "", "], got ", packed.scalar_type(), " ", packed.sizes());
  const int64_t h = packed.size(0), c = packed.size(1);
  const int64_t d = bits == 4 ? packed.size(2) * 2 : packed.size(2);
  TORCH_CHECK_VALUE(is_pow2(d), op, ": head_dim must be a power of two >= 2, got ", d);
  const int64_t p = std::max<int64_t>(d / kNormBlock, 1);
  TORCH_CHECK_VALUE(norms.scalar_type() == at::kFloat && norms.dim() == 3 && norms.size(0) == h &&
                        norms.size(1) == c && norms.size(2) == p,
                    op, ": norms must be float32 [", h, ", ", c, ", ", p, "] (H, C, max(D/256, 1) with D=", d,
                    "), got ", norms.scalar_type(), " ", norms.sizes());
  TORCH_CHECK_VALUE(codebook.scalar_type() == at::kFloat && codebook.dim() == 1 &&
                        codebook.size(0) == (int64_t(1) << bits),
                    op, ": codebook must be float32 [", int64_t(1) << bits, "] for bits=", bits, ", got ",
                    codebook.scalar_type(), " ", codebook.sizes());
  TORCH_CHECK_VALUE(norms.device() == packed.device() && codebook.device() == packed.device(), op,
                    ": packed, norms and codebook must be on one device");
  TORCH_CHECK_VALUE(packed.is_contiguous() && norms.is_contiguous(), op,
                    ": packed and norms must be contiguous (the cache is written in place)");
  check_u32(op, "packed.numel()", packed.numel());
  return {h, c, d, p};
}

KVArgs make_args(const Cache& k) {
  KVArgs a{};
  const int64_t block = std::min<int64_t>(k.head_dim, kNormBlock);
  a.rows = uint32_t(k.rows);
  a.capacity = uint32_t(k.capacity);
  a.head_dim = uint32_t(k.head_dim);
  a.block = uint32_t(block);
  a.norms_per_pos = uint32_t(k.norms_per_pos);
  // Rounded once from double, as ops/kv.py block_constants and the hadamard op's scalar.
  a.sqrt_block = float(std::sqrt(double(block)));
  a.rsqrt_block = float(1.0 / std::sqrt(double(block)));
  a.rsqrt_dim = float(1.0 / std::sqrt(double(k.head_dim)));
  return a;
}

void check_out(const char* op, const at::Tensor& out, int64_t required, const at::Tensor& packed) {
  TORCH_CHECK_VALUE(out.scalar_type() == at::kFloat && out.is_contiguous(), op,
                    ": out must be a contiguous float32 tensor, got ", out.scalar_type(),
                    " (contiguous=", out.is_contiguous() ? "True" : "False", ")");
  TORCH_CHECK_VALUE(out.device() == packed.device(), op, ": out is on ", out.device(), " but packed is on ",
                    packed.device());
  TORCH_CHECK_VALUE(out.numel() >= required, op, ": out has ", out.numel(), " elements, need ", required);
}

void check_range(const char* op, int64_t start, int64_t n, int64_t capacity) {
  TORCH_CHECK_VALUE(start >= 0 && n >= 0, op, ": start and n must be >= 0, got start=", start, ", n=", n);
  TORCH_CHECK_VALUE(start + n <= capacity, op, ": start(", start, ") + n(", n, ") > capacity(", capacity, ")");
}

std::string quantize_name(at::ScalarType t, int64_t bits, int64_t d) {
  return std::string("marlin_kv_quantize_") + kernel_dtype_name(t) + "_b" + std::to_string(bits) + "_d" +
         std::to_string(d);
}
std::string dequantize_name(int64_t bits) { return "marlin_kv_dequantize_b" + std::to_string(bits); }
std::string attention_name(int64_t bits, int64_t d) {
  return "marlin_kv_attention_b" + std::to_string(bits) + "_d" + std::to_string(d);
}

void check_kernel_dim(const char* op, int64_t d) {
  TORCH_CHECK_VALUE(d >= kMinKernelDim && d <= kMaxKernelDim, op, ": head_dim must be in ", kMinKernelDim, "..",
                    kMaxKernelDim, " for the Metal kernel, got ", d);
}

// Positions [start, start + n) of every row into `out` (exactly H * n * D floats).
void dispatch_dequantize(Launcher& l, const at::Tensor& packed, const at::Tensor& norms, const at::Tensor& codebook,
                         const Cache& k, int64_t bits, int64_t start, int64_t n, const at::Tensor& out) {
  KVArgs a = make_args(k);
  a.start = uint32_t(start);
  a.n = uint32_t(n);
  l.set_kernel(dequantize_name(bits));
  l.bind_tensor(0, packed, Access::Read, "packed");
  l.bind_tensor(1, norms, Access::Read, "norms");
  l.bind_tensor(2, codebook.contiguous(), Access::Read, "codebook");
  l.bind_tensor(3, out, Access::Write, "out");
  l.bind_value(4, a, "args");
  const uint32_t threads = uint32_t(std::min<int64_t>(k.head_dim, kMaxThreads));
  l.dispatch_threadgroups({uint32_t(k.rows), uint32_t(n), 1}, {threads, 1, 1});
}

// The first `count` elements of `out`, as a tensor of exactly that size (so the emulator's
// guard page sits right after what the kernel may write, and the rest of `out` is untouched).
at::Tensor head_of(const at::Tensor& out, int64_t count) { return out.view({-1}).narrow(0, 0, count); }

}  // namespace

void kv_quantize(Launcher& l, const at::Tensor& x, const at::Tensor& positions, const at::Tensor& packed,
                 const at::Tensor& norms, const at::Tensor& codebook, int64_t bits) {
  constexpr const char* op = "marlin.kv_quantize";
  const Cache k = check_cache(op, packed, norms, codebook, bits);
  TORCH_CHECK_VALUE(kernel_dtype_name(x.scalar_type()) != nullptr && x.dim() == 3 && x.size(0) == k.rows &&
                        x.size(2) == k.head_dim,
                    op, ": x must be float16/bfloat16/float32 [", k.rows, ", n, ", k.head_dim,
                    "] to match packed, got ", x.scalar_type(), " ", x.sizes());
  const int64_t n = x.size(1);
  TORCH_CHECK_VALUE(positions.scalar_type() == at::kLong && positions.dim() == 1 && positions.size(0) == n, op,
                    ": positions must be int64 [", n, "] (one per token of x), got ", positions.scalar_type(), " ",
                    positions.sizes());
  TORCH_CHECK_VALUE(x.device() == packed.device() && positions.device() == packed.device(), op,
                    ": x and positions must be on the cache's device");
  if (n == 0 || k.rows == 0) return;
  check_kernel_dim(op, k.head_dim);
  at::Tensor pc = positions.contiguous();
  if (pc.device().is_cpu()) {
    // Checked where it is free (CPU tensors: the emulator). On MPS this would need a sync; the
    // kernel writes nothing for a position outside [0, C).
    const int64_t lo = pc.min().item<int64_t>(), hi = pc.max().item<int64_t>();
    TORCH_CHECK_VALUE(lo >= 0 && hi < k.capacity, op, ": positions must lie in [0, ", k.capacity,
                      ") (wrap them), got min ", lo, ", max ", hi);
  }
  KVArgs a = make_args(k);
  a.n = uint32_t(n);
  l.set_kernel(quantize_name(x.scalar_type(), bits, k.head_dim));
  l.bind_tensor(0, x.contiguous(), Access::Read, "x");
  l.bind_tensor(1, pc, Access::Read, "positions");
  l.bind_tensor(2, packed, Access::ReadWrite, "packed");
  l.bind_tensor(3, norms, Access::ReadWrite, "norms");
  l.bind_tensor(4, codebook.contiguous(), Access::Read, "codebook");
  l.bind_value(5, a, "args");
  const uint32_t threads = uint32_t(std::min<int64_t>(k.head_dim, kMaxThreads));
  l.dispatch_threadgroups({uint32_t(k.rows), uint32_t(n), 1}, {threads, 1, 1});
}

at::Tensor kv_dequantize(Launcher& l, const at::Tensor& packed, const at::Tensor& norms, const at::Tensor& codebook,
                         int64_t pos, int64_t bits) {
  constexpr const char* op = "marlin.kv_dequantize";
  const Cache k = check_cache(op, packed, norms, codebook, bits);
  at::Tensor out = at::empty({k.rows, k.head_dim}, packed.options().dtype(at::kFloat));
  if (k.rows == 0) return out;
  TORCH_CHECK_VALUE(pos >= 0 && pos < k.capacity, op, ": pos must lie in [0, ", k.capacity, "), got ", pos);
  dispatch_dequantize(l, packed, norms, codebook, k, bits, pos, 1, out);
  return out;
}

void kv_dequantize_out(Launcher& l, const at::Tensor& packed, const at::Tensor& norms, const at::Tensor& codebook,
                       int64_t pos, int64_t bits, const at::Tensor& out) {
  constexpr const char* op = "marlin.kv_dequantize_out";
  const Cache k = check_cache(op, packed, norms, codebook, bits);
  check_out(op, out, k.rows * k.head_dim, packed);
  if (k.rows == 0) return;
  TORCH_CHECK_VALUE(pos >= 0 && pos < k.capacity, op, ": pos must lie in [0, ", k.capacity, "), got ", pos);
  dispatch_dequantize(l, packed, norms, codebook, k, bits, pos, 1, head_of(out, k.rows * k.head_dim));
}

at::Tensor kv_dequantize_seq(Launcher& l, const at::Tensor& packed, const at::Tensor& norms,
                             const at::Tensor& codebook, int64_t start, int64_t n, int64_t bits) {
  constexpr const char* op = "marlin.kv_dequantize_seq";
  const Cache k = check_cache(op, packed, norms, codebook, bits);
  at::Tensor out = at::empty({k.rows, std::max<int64_t>(n, 0), k.head_dim}, packed.options().dtype(at::kFloat));
  if (k.rows == 0 || n == 0) return out;
  check_range(op, start, n, k.capacity);
  dispatch_dequantize(l, packed, norms, codebook, k, bits, start, n, out);
  return out;
}

void kv_dequantize_seq_out(Launcher& l, const at::Tensor& packed, const at::Tensor& norms,
                           const at::Tensor& codebook, int64_t start, int64_t n, int64_t bits,
                           const at::Tensor& out) {
  constexpr const char* op = "marlin.kv_dequantize_seq_out";
  const Cache k = check_cache(op, packed, norms, codebook, bits);
  const int64_t required = k.rows * std::max<int64_t>(n, 0) * k.head_dim;
  check_out(op, out, required, packed);
  if (k.rows == 0 || n == 0) return;
  check_range(op, start, n, k.capacity);
  dispatch_dequantize(l, packed, norms, codebook, k, bits, start, n, head_of(out, required));
}

at::Tensor kv_attention(Launcher& l, const at::Tensor& q, const at::Tensor& k_packed, const at::Tensor& k_norms,
                        const at::Tensor& v_packed, const at::Tensor& v_norms, const at::Tensor& codebook,
                        int64_t length, int64_t bits, double scale) {
  constexpr const char* op = "marlin.kv_attention";
  const Cache k = check_cache("marlin.kv_attention (keys)", k_packed, k_norms, codebook, bits);
  const Cache v = check_cache("marlin.kv_attention (values)", v_packed, v_norms, codebook, bits);
  TORCH_CHECK_VALUE(v.rows == k.rows && v.capacity == k.capacity && v.head_dim == k.head_dim, op,
                    ": value cache [H=", v.rows, ", C=", v.capacity, ", D=", v.head_dim, "] must match key cache [",
                    k.rows, ", ", k.capacity, ", ", k.head_dim, "]");
  TORCH_CHECK_VALUE(kernel_dtype_name(q.scalar_type()) != nullptr && q.dim() == 3 && q.size(0) == k.rows &&
                        q.size(2) == k.head_dim,
                    op, ": q must be float16/bfloat16/float32 [", k.rows, ", G, ", k.head_dim, "], got ",
                    q.scalar_type(), " ", q.sizes());
  TORCH_CHECK_VALUE(q.device() == k_packed.device(), op, ": q is on ", q.device(), " but the cache is on ",
                    k_packed.device());
  TORCH_CHECK_VALUE(length >= 1 && length <= k.capacity, op, ": length must lie in [1, ", k.capacity,
                    "] (capacity), got ", length);
  const int64_t g = q.size(1);
  at::Tensor out = at::empty({k.rows, g, k.head_dim}, q.options().dtype(at::kFloat));
  if (k.rows == 0 || g == 0) return out;
  check_kernel_dim(op, k.head_dim);
  const int64_t chunks = (length + kAttnChunk - 1) / kAttnChunk;
  KVArgs a = make_args(k);
  a.length = uint32_t(length);
  a.group = uint32_t(g);
  a.chunk = uint32_t(kAttnChunk);
  a.chunks = uint32_t(chunks);
  a.scale = float(scale);
  const int64_t heads = k.rows * g;
  auto f32 = q.options().dtype(at::kFloat);
  at::Tensor part_m = at::empty({heads, chunks}, f32), part_l = at::empty({heads, chunks}, f32);
  at::Tensor part_acc = at::empty({heads, chunks, k.head_dim}, f32);
  l.set_kernel(attention_name(bits, k.head_dim));
  l.bind_tensor(0, q.to(at::kFloat).contiguous(), Access::Read, "q");
  l.bind_tensor(1, k_packed, Access::Read, "k_packed");
  l.bind_tensor(2, k_norms, Access::Read, "k_norms");
  l.bind_tensor(3, v_packed, Access::Read, "v_packed");
  l.bind_tensor(4, v_norms, Access::Read, "v_norms");
  l.bind_tensor(5, codebook.contiguous(), Access::Read, "codebook");
  l.bind_tensor(6, part_m, Access::Write, "part_m");
  l.bind_tensor(7, part_l, Access::Write, "part_l");
  l.bind_tensor(8, part_acc, Access::Write, "part_acc");
  l.bind_value(9, a, "args");
  // one threadgroup per (row, slice of up to 8 of its query heads, chunk): the slice shares each
  // position's decoded key and value
  const int64_t slices = (g + kAttnHeads - 1) / kAttnHeads;
  l.dispatch_threadgroups({uint32_t(k.rows), uint32_t(slices), uint32_t(chunks)}, {kAttnThreads, 1, 1});
  l.set_kernel("marlin_kv_attention_reduce");
  l.bind_tensor(0, part_m, Access::Read, "part_m");
  l.bind_tensor(1, part_l, Access::Read, "part_l");
  l.bind_tensor(2, part_acc, Access::Read, "part_acc");
  l.bind_tensor(3, out, Access::Write, "out");
  l.bind_value(4, a, "args");
  const uint32_t tx = uint32_t(std::min<int64_t>(k.head_dim, kMaxThreads));
  l.dispatch_threads({uint32_t(k.head_dim), uint32_t(heads), 1}, {tx, 1, 1});
  return out;
}

std::vector<std::string> kv_kernel_names() {
  std::vector<std::string> names;
  for (int64_t bits : kBits) {
    names.push_back(dequantize_name(bits));
    for (int64_t d = kMinKernelDim; d <= kMaxKernelDim; d *= 2) {
      names.push_back(attention_name(bits, d));
      for (at::ScalarType t : kActivationTypes) names.push_back(quantize_name(t, bits, d));
    }
  }
  names.push_back("marlin_kv_attention_reduce");
  return names;
}

}  // namespace marlin
