// moe_route (router logits -> top-k ids and weights), per logits type (shaders/moe_route.h).
#include "moe_route.h"
#include "bfloat.h"

instantiate_moe_route(float16, half)
MARLIN_IF_BFLOAT(instantiate_moe_route(bfloat16, bfloat))
instantiate_moe_route(float32, float)
