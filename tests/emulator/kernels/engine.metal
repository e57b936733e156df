// Kernels that exercise the MSL emulator itself (tests/emulator/test_engine.py); several
// carry a deliberately planted bug that the emulator must report.
#include <metal_stdlib>
using namespace metal;

// Each thread writes its builtin positions (checks grid/threadgroup bookkeeping).
kernel void emu_positions(device uint4* out [[buffer(0)]],
                          uint3 gid [[thread_position_in_grid]],
                          uint3 tgp [[threadgroup_position_in_grid]],
                          uint tidx [[thread_index_in_threadgroup]],
                          uint lane [[thread_index_in_simdgroup]],
                          uint sg [[simdgroup_index_in_threadgroup]],
                          uint3 tpg [[threads_per_grid]],
                          uint3 tptg [[threads_per_threadgroup]]) {
  const uint i = gid.y * tpg.x + gid.x;
  out[i] = uint4(tgp.x + 100 * tgp.y, tidx, lane + 100 * sg, tptg.x * tptg.y);
}

// Vector construction, swizzle reads and writes, conversions.
kernel void emu_vectors(device const float4* x [[buffer(0)]], device float4* y [[buffer(1)]],
                        device half4* h [[buffer(2)]], uint i [[thread_position_in_grid]]) {
  float4 v = x[i];
  float4 w = float4(v.zw, v.x, 1.0f);
  w.xy = w.yx * 2.0f;
  w.w += v.y;
  y[i] = w;
  h[i] = half4(v.wzyx);
}

// Threadgroup reduction with barriers; 64 threads per group.
kernel void emu_tg_reduce(device const float* x [[buffer(0)]], device float* out [[buffer(1)]],
                          uint tid [[thread_position_in_threadgroup]],
                          uint g [[threadgroup_position_in_grid]]) {
  threadgroup float buf[64];
  buf[tid] = x[g * 64 + tid];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint s = 32; s > 0; s >>= 1) {
    if (tid < s) buf[tid] += buf[tid + s];
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  if (tid == 0) out[g] = buf[0];
}

// simd functions: each lane writes several results.
kernel void emu_simd(device const float* x [[buffer(0)]], device float* out [[buffer(1)]],
                     uint i [[thread_position_in_grid]], uint lane [[thread_index_in_simdgroup]]) {
  const float v = x[i];
  out[8 * i + 0] = simd_sum(v);
  out[8 * i + 1] = simd_max(v);
  out[8 * i + 2] = simd_prefix_exclusive_sum(v);
  out[8 * i + 3] = simd_shuffle_xor(v, 5);
  out[8 * i + 4] = simd_shuffle_down(v, 3);
  out[8 * i + 5] = simd_broadcast(v, 7);
  out[8 * i + 6] = simd_shuffle(v, (lane * 3) % 32);
  out[8 * i + 7] = simd_prefix_inclusive_sum(v);
}

// 8x8 simdgroup matrix multiply-accumulate: D = A * B + C, one simdgroup.
kernel void emu_matrix(device const float* a [[buffer(0)]], device const half* b [[buffer(1)]],
                       device float* d [[buffer(2)]]) {
  simdgroup_float8x8 ma, mc;
  simdgroup_half8x8 mb;
  simdgroup_load(ma, a);
  simdgroup_load(mb, b, 8, ulong2(0), true);
  mc = make_filled_simdgroup_matrix<float, 8, 8>(1.0f);
  simdgroup_multiply_accumulate(mc, ma, mb, mc);
  simdgroup_store(mc, d);
}

// Float4 loads from a buffer whose length is not a multiple of 4 floats (the guarded copy
// then starts 4-byte aligned only): must work, like on the GPU where buffers are aligned.
kernel void emu_vec_tail(device const float* x [[buffer(0)]], device float* y [[buffer(1)]],
                         constant uint& n [[buffer(2)]], uint i [[thread_position_in_grid]]) {
  if (4 * i + 3 < n) {
    ((device float4*)y)[i] = ((device const float4*)x)[i] * 2.0f;
  } else {
    for (uint k = 4 * i; k < n; ++k) y[k] = x[k] * 2.0f;
  }
}

// --- planted bugs -------------------------------------------------------------------------

// BUG: reads one element past the end of x.
kernel void emu_bug_oob(device const float* x [[buffer(0)]], device float* y [[buffer(1)]],
                        uint i [[thread_position_in_grid]]) {
  y[i] = x[i + 1];
}

// BUG: reads one element before the start of x (a page-sized buffer, so the guard is exact).
kernel void emu_bug_underflow(device const float* x [[buffer(0)]], device float* y [[buffer(1)]],
                              uint i [[thread_position_in_grid]]) {
  y[i] = x[int(i) - 1];
}

// BUG: threads past n return before the barrier the others wait at.
kernel void emu_bug_exit_before_barrier(device float* y [[buffer(0)]],
                                        uint tid [[thread_position_in_threadgroup]]) {
  threadgroup float t[64];
  if (tid >= 40) return;
  t[tid] = float(tid);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  y[tid] = t[(tid + 1) % 40];
}

// BUG: the two halves of the group wait at different barriers.
kernel void emu_bug_two_barriers(device float* y [[buffer(0)]],
                                 uint tid [[thread_position_in_threadgroup]]) {
  if (tid < 32) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
  } else {
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  y[tid] = 1.0f;
}

// BUG: reads threadgroup memory that no thread wrote: t[63] (thread 62 reads it).
kernel void emu_bug_uninit_tg(device float* y [[buffer(0)]],
                              uint tid [[thread_position_in_threadgroup]]) {
  threadgroup float t[64];
  if (tid < 63) t[tid] = float(tid);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  y[tid] = t[(tid + 1) % 64];
}

// BUG: lanes of one simdgroup call simd_sum from two different branches.
kernel void emu_bug_simd_divergence(device float* y [[buffer(0)]],
                                    uint lane [[thread_index_in_simdgroup]]) {
  float v = float(lane);
  if (lane < 16) {
    v = simd_sum(v);
  } else {
    v = simd_sum(v * 2.0f);
  }
  y[lane] = v;
}

// BUG: some lanes wait at a simd operation while the others wait at a threadgroup barrier.
kernel void emu_bug_simd_vs_barrier(device float* y [[buffer(0)]],
                                    uint lane [[thread_index_in_simdgroup]]) {
  float v = float(lane);
  if (lane < 8) v = simd_sum(v);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  y[lane] = v;
}

// BUG: writes only the even elements of its output.
kernel void emu_bug_unwritten(device float* y [[buffer(0)]], uint i [[thread_position_in_grid]]) {
  if (i % 2 == 0) y[i] = 1.0f;
}

// BUG: writes into its input.
kernel void emu_bug_writes_input(device float* x [[buffer(0)]], uint i [[thread_position_in_grid]]) {
  x[i] = 0.0f;
}

// BUG: more threadgroup memory than Metal allows (40 KiB > 32 KiB).
kernel void emu_bug_tg_too_big(device float* y [[buffer(0)]],
                               uint tid [[thread_position_in_threadgroup]]) {
  threadgroup float big[10240];
  big[tid] = 1.0f;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  y[tid] = big[tid];
}

// --- more of the shim ----------------------------------------------------------------------

// Math and relational functions, one row of results per input element.
kernel void emu_math(device const float* x [[buffer(0)]], device float* out [[buffer(1)]],
                     uint i [[thread_position_in_grid]]) {
  const float v = x[i];
  device float* o = out + 12 * i;
  o[0] = round(v);                       // halfway away from zero
  o[1] = rint(v);                        // halfway to even
  o[2] = clamp(v, -1.0f, 1.0f);          // NaN -> -1 (fmin/fmax semantics)
  o[3] = select(0.0f, 1.0f, isnan(v));
  o[4] = fast::exp(v * 0.1f);
  o[5] = precise::sqrt(fabs(v));
  o[6] = fma(v, 2.0f, 1.0f);
  o[7] = float(half(v));                 // round to half
  o[8] = float(bfloat(v));               // round to bfloat
  o[9] = max(v, 0.5f);
  o[10] = float(as_type<uint>(v) >> 31);
  o[11] = float(int(v));                 // truncation toward zero
}

// Integer and bool vectors: arithmetic wraps in the element type; comparisons give bool vectors.
kernel void emu_int_vectors(device const uchar4* a [[buffer(0)]], device ushort4* s [[buffer(1)]],
                            device int4* cmp [[buffer(2)]], uint i [[thread_position_in_grid]]) {
  const uchar4 v = a[i];
  const uchar4 w = v + uchar4(200);      // wraps modulo 256
  s[i] = ushort4(w) * ushort4(300);      // wraps modulo 65536
  const bool4 gt = v > uchar4(100);
  cmp[i] = int4(select(int4(0), int4(1), gt)) + int4(all(gt) ? 10 : 0, any(gt) ? 20 : 0, 0, 0);
}

// Device atomics from every thread of many threadgroups (which run on several OS threads).
kernel void emu_atomics(device atomic_uint* counter [[buffer(0)]], device atomic_int* maxv [[buffer(1)]],
                        uint i [[thread_position_in_grid]]) {
  atomic_fetch_add_explicit(counter, 1u, memory_order_relaxed);
  atomic_fetch_max_explicit(maxv, int(i), memory_order_relaxed);
}

// The remaining simd functions, and simdgroup_barrier.
kernel void emu_simd_more(device const float* x [[buffer(0)]], device float* out [[buffer(1)]],
                          uint i [[thread_position_in_grid]]) {
  const float v = x[i];
  out[6 * i + 0] = simd_min(v);
  out[6 * i + 1] = simd_shuffle_up(v, 2);
  out[6 * i + 2] = simd_broadcast_first(v);
  simdgroup_barrier(mem_flags::mem_none);
  out[6 * i + 3] = simd_any(v > 1.5f) ? 1.0f : 0.0f;
  out[6 * i + 4] = simd_all(v > -10.0f) ? 1.0f : 0.0f;
  out[6 * i + 5] = simd_is_first() ? 1.0f : 0.0f;
}

// BUG: a thread-private array larger than the fiber stack.
kernel void emu_bug_stack_overflow(device float* y [[buffer(0)]], constant uint& n [[buffer(1)]],
                                   uint i [[thread_position_in_grid]]) {
  float big[200000];
  for (uint k = 0; k < n; ++k) big[k] = float(k);
  y[i] = big[n - 1 - i];
}

// BUG: missing barrier between writing and reading threadgroup memory: each thread reads its
// neighbour's slot. Correct only if the neighbour happened to run first.
kernel void emu_bug_missing_barrier(device float* y [[buffer(0)]],
                                    uint tid [[thread_position_in_threadgroup]]) {
  threadgroup float t[64];
  t[tid] = float(tid);
  y[tid] = t[(tid + 63) % 64];
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

// BUG: half of the simdgroup skips a simdgroup_load (matrix operations must be uniform).
kernel void emu_bug_matrix_divergence(device const float* x [[buffer(0)]], device float* y [[buffer(1)]],
                                      uint lane [[thread_index_in_simdgroup]]) {
  simdgroup_float8x8 m = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  if (lane < 16) simdgroup_load(m, x);
  simdgroup_store(m, y);
}

// Simdgroup 0 writes threadgroup memory and simdgroup 1 reads it with only a simd operation
// between them (BUG: no threadgroup_barrier). In forward order every simd operation happens to
// act as a group-wide meeting point, so the read sees the write; a skewed schedule, where
// simdgroup 1 runs alone up to the barrier first, shows it.
kernel void emu_bug_simd_as_barrier(device float* y [[buffer(0)]],
                                    uint tid [[thread_index_in_threadgroup]],
                                    uint simd [[simdgroup_index_in_threadgroup]],
                                    uint lane [[thread_index_in_simdgroup]]) {
  threadgroup float t[32];
  if (simd == 0) t[lane] = float(lane);
  const float s = simd_sum(1.0f);
  y[tid] = simd == 1 ? t[lane] + s : s;
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

// Correct version: the barrier separates the write and the read.
kernel void emu_simd_then_barrier(device float* y [[buffer(0)]],
                                  uint tid [[thread_index_in_threadgroup]],
                                  uint simd [[simdgroup_index_in_threadgroup]],
                                  uint lane [[thread_index_in_simdgroup]]) {
  threadgroup float t[32];
  if (simd == 0) t[lane] = float(lane);
  const float s = simd_sum(1.0f);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  y[tid] = simd == 1 ? t[lane] + s : s;
}

// A float4 load at the element offset the host passes: aligned when `first` is a multiple of
// 4 and the binding's byte offset a multiple of 16, misaligned otherwise (BUG when so).
kernel void emu_vector_load(device const float* x [[buffer(0)]], device float4* y [[buffer(1)]],
                            constant uint& first [[buffer(2)]], uint i [[thread_position_in_grid]]) {
  y[i] = *(device const float4*)(x + first + 4 * i);
}

// BUG: a half4 load from threadgroup memory at a 2-byte offset.
kernel void emu_bug_tg_misaligned(device float* y [[buffer(0)]], uint i [[thread_position_in_grid]]) {
  threadgroup half t[16];
  t[i] = half(i);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const half4 v = *(threadgroup const half4*)(t + 1);
  y[i] = float(v.x);
}

// BUG: two threads of different threadgroups write the same output element.
kernel void emu_bug_device_ww(device float* y [[buffer(0)]], uint i [[thread_position_in_grid]]) {
  y[i / 2] = float(i);
}

// Two threads of one threadgroup write the same element, separated by a barrier: not a
// conflict (Metal orders them through the barrier's device-memory fence).
kernel void emu_device_ww_ordered(device float* y [[buffer(0)]], uint i [[thread_position_in_grid]]) {
  if (i == 0) y[0] = 1.0f;
  threadgroup_barrier(mem_flags::mem_device);
  if (i == 1) y[0] = 2.0f;
}

// BUG: a store one element past a threadgroup array.
kernel void emu_bug_tg_oob(device float* y [[buffer(0)]], uint i [[thread_position_in_grid]]) {
  threadgroup float t[32];
  threadgroup float u[32];
  t[i + 1] = 1.0f;
  u[i] = 2.0f;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  y[i] = t[i] + u[i];
}

// Traffic patterns for the counters: each thread reads `x[i * stride.x]` (4 bytes) and stores
// it at threadgroup word `tid * stride.y`; after the barrier lanes 0..15 of each simdgroup read
// their word back, join a simd_sum and write y[i].
kernel void emu_access_pattern(device const float* x [[buffer(0)]], device float* y [[buffer(1)]],
                               constant uint2& stride [[buffer(2)]], uint i [[thread_position_in_grid]],
                               uint tid [[thread_index_in_threadgroup]],
                               uint lane [[thread_index_in_simdgroup]]) {
  threadgroup float t[2048];
  t[tid * stride.y] = x[i * stride.x];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (lane < 16) y[i] = t[tid * stride.y] + simd_sum(1.0f);
}
