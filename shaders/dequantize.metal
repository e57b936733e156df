// dequantize kernels, one row per format (the table of docs/FORMAT.md §3).
#include "dequantize.h"
#include "bfloat.h"

instantiate_dequantize_groups(fp4, fp4_format)
instantiate_dequantize_types(mxfp4, mxfp4_format, 32, 32)
instantiate_dequantize_types(nvfp4, nvfp4_format, 16, 16)
instantiate_dequantize_affine_groups(int8, int8_format)
instantiate_dequantize_affine_groups(int4, int4_format)
instantiate_dequantize_affine_groups(int3, int3_format)
instantiate_dequantize_affine_groups(int2, int2_format)
instantiate_dequantize_groups(nf4, nf4_format)
instantiate_dequantize_groups(nf3, nf3_format)
instantiate_dequantize_groups(fp8_e4m3, fp8_e4m3_format)
instantiate_dequantize_groups(fp8_e5m2, fp8_e5m2_format)
instantiate_dequantize_affine_groups(int6, int6_format)
instantiate_dequantize_affine_groups(int5, int5_format)
