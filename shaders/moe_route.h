// marlin::moe_route: router logits [rows, E] -> top-k expert ids and weights, one thread per
// row (a router's work is E values per token, tiny next to the expert GEMMs; one thread keeps
// the selection sequential and exactly the torch op's order). The k picks are k passes over E:
// each takes the best (value, id) strictly below the previous pick in the order "value
// descending, then id ascending", so no list of chosen ids is needed and ties go to the lower
// id, as ops/moe_route.py does. Arithmetic in fp32.
#pragma once

#include <metal_stdlib>

#include "args.h"

using namespace metal;

struct MoeRouteShape {
  enum {
    THREADS = 64,    // rows per threadgroup
    MAX_TOP_K = 32,  // top_k and n_group limits (ops/moe_route.py checks them)
  };
};

// (v, e) comes before (best_v, best_e) in the pick order.
METAL_FUNC bool route_before(float v, uint e, float best_v, uint best_e) {
  return v > best_v || (v == best_v && e < best_e);
}

// The value mode a.mode ranks expert e by (mx, sum: softmax_topk's max and sum of exp).
template <typename T>
METAL_FUNC float route_score(device const T* l, device const float* bias, constant MoeRouteArgs& a,
                             float mx, float sum, uint e) {
  const float v = float(l[e]);
  if (a.mode == MARLIN_ROUTE_SOFTMAX_TOPK) return exp(v - mx) / sum;
  if (a.mode == MARLIN_ROUTE_TOPK_SOFTMAX) return v;
  const float s = 1.0f / (1.0f + exp(-v));
  return a.has_bias ? s + bias[e] : s;
}

template <typename T>
METAL_FUNC void moe_route_impl(device const T* logits, device const float* bias, device float* weights,
                               device long* ids, constant MoeRouteArgs& a, uint row) {
  if (row >= a.rows) return;
  device const T* l = logits + ulong(row) * a.experts;
  const bool sigmoid_mode = a.mode == MARLIN_ROUTE_SIGMOID;
  // softmax_topk ranks the probabilities exp(l - max) / sum, computed as the torch op does.
  float mx = -INFINITY, sum = 0.0f;
  if (a.mode == MARLIN_ROUTE_SOFTMAX_TOPK) {
    for (uint e = 0; e < a.experts; ++e) mx = max(mx, float(l[e]));
    for (uint e = 0; e < a.experts; ++e) sum += exp(float(l[e]) - mx);
  }
  // Group-limited selection (sigmoid): a group's score is the sum of its two best choice
  // scores; the topk_group best groups stay (bit g of keep).
  uint keep = ~0u;
  const uint gsize = a.experts / a.n_group;
  if (sigmoid_mode && a.n_group > 1) {
    float gscore[MoeRouteShape::MAX_TOP_K];
    for (uint g = 0; g < a.n_group; ++g) {
      float b1 = -INFINITY, b2 = -INFINITY;
      for (uint e = g * gsize; e < (g + 1) * gsize; ++e) {
        const float c = route_score(l, bias, a, mx, sum, e);
        if (c > b1) { b2 = b1; b1 = c; } else if (c > b2) { b2 = c; }
      }
      gscore[g] = b1 + b2;
    }
    keep = 0u;
    float prev_v = INFINITY;
    uint prev_g = 0;
    for (uint j = 0; j < a.topk_group; ++j) {
      float best_v = -INFINITY;
      uint best_g = ~0u;
      for (uint g = 0; g < a.n_group; ++g) {
        const bool below = j == 0 || route_before(prev_v, prev_g, gscore[g], g);
        if (below && (best_g == ~0u || route_before(gscore[g], g, best_v, best_g))) {
          best_v = gscore[g];
          best_g = g;
        }
      }
      keep |= 1u << best_g;
      prev_v = best_v;
      prev_g = best_g;
    }
  }
  uint chosen[MoeRouteShape::MAX_TOP_K];
  float value[MoeRouteShape::MAX_TOP_K];
  float prev_v = INFINITY;
  uint prev_e = 0;
  for (uint j = 0; j < a.top_k; ++j) {
    float best_v = -INFINITY;
    uint best_e = ~0u;
    for (uint e = 0; e < a.experts; ++e) {
      if (((keep >> min(e / gsize, 31u)) & 1u) == 0u) continue;
      const float c = route_score(l, bias, a, mx, sum, e);
      const bool below = j == 0 || route_before(prev_v, prev_e, c, e);
      if (below && (best_e == ~0u || route_before(c, e, best_v, best_e))) {
        best_v = c;
        best_e = e;
      }
    }
    chosen[j] = best_e;
    value[j] = best_v;
    prev_v = best_v;
    prev_e = best_e;
  }
  // Weights.
  float w[MoeRouteShape::MAX_TOP_K];
  float total = 0.0f;
  for (uint j = 0; j < a.top_k; ++j) {
    if (a.mode == MARLIN_ROUTE_SOFTMAX_TOPK) w[j] = value[j];
    else if (a.mode == MARLIN_ROUTE_TOPK_SOFTMAX) w[j] = exp(value[j] - value[0]);  // value[0] is the max
    else w[j] = 1.0f / (1.0f + exp(-float(l[chosen[j]])));
    total += w[j];
  }
  const bool divide = a.mode == MARLIN_ROUTE_TOPK_SOFTMAX || a.renormalize != 0;
  const float denom = sigmoid_mode ? total + 1e-20f : total;
  for (uint j = 0; j < a.top_k; ++j) {
    const ulong o = ulong(row) * a.top_k + j;
    weights[o] = (divide ? w[j] / denom : w[j]) * a.scaling;
    ids[o] = long(chosen[j]);
  }
}

// Thin named kernels marlin_moe_route_<dtype> (csrc/ops/moe_route.cpp builds the names).
// Slots: 0 logits, 1 bias (float32 [E]), 2 weights (float32 [rows, k]), 3 ids (int64), 4 args.
#define instantiate_moe_route(type_name, T)                                                       \
  kernel void marlin_moe_route_##type_name(                                                       \
      device const T *logits [[buffer(0)]], device const float *bias [[buffer(1)]],               \
      device float *weights [[buffer(2)]], device long *ids [[buffer(3)]],                        \
      constant MoeRouteArgs &args [[buffer(4)]], uint row [[thread_position_in_grid]]) {          \
    moe_route_impl<T>(logits, bias, weights, ids, args, row);                                     \
  }
