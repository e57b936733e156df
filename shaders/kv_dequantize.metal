// kv_dequantize / kv_dequantize_seq kernel (one per bit width; any head_dim) and the decode
// attention kernels (bits x head_dim 32..512) with their chunk-merge kernel.
#include "kv.h"
#include "bfloat.h"

instantiate_kv_dequantize(4)
instantiate_kv_dequantize(5)
instantiate_kv_dequantize(6)
instantiate_kv_dequantize(8)

instantiate_kv_head_dims(instantiate_kv_attention, 4)
instantiate_kv_head_dims(instantiate_kv_attention, 5)
instantiate_kv_head_dims(instantiate_kv_attention, 6)
instantiate_kv_head_dims(instantiate_kv_attention, 8)

kernel void marlin_kv_attention_reduce(device const float* part_m [[buffer(0)]],
                                       device const float* part_l [[buffer(1)]],
                                       device const float* part_acc [[buffer(2)]], device float* out [[buffer(3)]],
                                       constant KVArgs& args [[buffer(4)]],
                                       uint2 pos [[thread_position_in_grid]]) {
  kv_attention_reduce_impl(part_m, part_l, part_acc, out, args, pos);
}
