// kv_quantize kernels: activation dtype x bits x head_dim (32..512).
#include "kv.h"
#include "bfloat.h"

#define instantiate_kv_quantize_bits(type_name, T)              \
  instantiate_kv_head_dims(instantiate_kv_quantize, type_name, T, 4) \
  instantiate_kv_head_dims(instantiate_kv_quantize, type_name, T, 5) \
  instantiate_kv_head_dims(instantiate_kv_quantize, type_name, T, 6) \
  instantiate_kv_head_dims(instantiate_kv_quantize, type_name, T, 8)

instantiate_kv_quantize_bits(float16, half)
#if MARLIN_HAS_BFLOAT
instantiate_kv_quantize_bits(bfloat16, bfloat)
#endif
instantiate_kv_quantize_bits(float32, float)
