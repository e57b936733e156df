// Gated activations y = T(T(act(gate)) * up), one thread per output element, as the torch ops
// compute them (metal_marlin_torch/ops/layer.py): the activation in float and rounded to T (what
// ACT2FN returns), then the product rounded to T. `up` may be gate's own second half (a fused
// gate_up projection): the host binds the same tensor and says where up starts (ActArgs).
#pragma once

#include <metal_stdlib>

#include "layer_args.h"

using namespace metal;

// torch's silu: x / (1 + exp(-x)) (silu(-inf) = NaN, as in torch).
struct SiluAct {
  static METAL_FUNC float apply(float g) { return g / (1.0f + exp(-g)); }
};

// torch's gelu(approximate="tanh"): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
struct GeluTanhAct {
  static METAL_FUNC float apply(float g) {
    const float kBeta = 0.7978845608028654f;  // sqrt(2 / pi)
    const float kKappa = 0.044715f;
    return 0.5f * g * (1.0f + tanh(kBeta * (g + kKappa * g * g * g)));
  }
};

template <typename T,    // element type: half, bfloat or float
          typename Act>  // SiluAct or GeluTanhAct
METAL_FUNC void gated_act_impl(device const T* gate, device const T* up, device T* y, constant ActArgs& args,
                               uint2 pos) {
  const uint i = pos.x, r = pos.y;
  if (i >= args.inter || r >= args.rows) return;
  const float g = float(gate[ulong(r) * args.gate_stride + i]);
  const float u = float(up[ulong(r) * args.up_stride + args.up_offset + i]);
  y[ulong(r) * args.inter + i] = T(float(T(Act::apply(g))) * u);
}

#define instantiate_gated_act(name, Act, type_name, T)                                                  \
  kernel void marlin_##name##_##type_name(device const T* gate [[buffer(0)]], device const T* up [[buffer(1)]], \
                                          device T* y [[buffer(2)]], constant ActArgs& args [[buffer(3)]], \
                                          uint2 pos [[thread_position_in_grid]]) {                     \
    gated_act_impl<T, Act>(gate, up, y, args, pos);                                                     \
  }

#define instantiate_gated_acts(type_name, T)                \
  instantiate_gated_act(silu_mul, SiluAct, type_name, T)     \
  instantiate_gated_act(gelu_mul, GeluTanhAct, type_name, T)
