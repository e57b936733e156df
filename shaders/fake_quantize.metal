// fake_quantize kernels: vec and block variants per activation dtype.
#include "fake_quantize.h"

instantiate_fake_quantize(float16, half)
instantiate_fake_quantize(bfloat16, bfloat)
instantiate_fake_quantize(float32, float)
