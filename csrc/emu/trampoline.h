// Helpers for the kernel trampolines that metal_marlin_torch/emulator.py appends to each
// emulated .metal translation unit: bind buffers and builtin attributes to the kernel's
// parameters by their [[buffer(i)]] / [[thread_position_in_grid]] / ... attributes.
#pragma once

#include <type_traits>

#include "runtime.h"

namespace metal_emu {

template <class F>
struct fn_traits;
template <class R, class... A>
struct fn_traits<R (*)(A...)> {
  template <unsigned I>
  using arg = __type_pack_element<I, A...>;
};
template <class F, unsigned I>
using param_t = typename fn_traits<F>::template arg<I>;

[[noreturn]] void bind_error(const KernelArgs& a, int index, const char* param, const char* what);

template <class T>
T bind_buffer(const KernelArgs& a, int index, const char* param) {
  const BoundBuffer& b = a.buffers[index];
  if constexpr (std::is_pointer_v<T>) {
    // Unbound pointer parameters are null: touching them faults and is reported.
    return b.bound ? reinterpret_cast<T>(b.ptr) : nullptr;
  } else {
    static_assert(std::is_reference_v<T>, "buffer parameters are pointers or references");
    using V = std::remove_reference_t<T>;
    if (!b.bound) bind_error(a, index, param, "is not bound");
    if (b.size < sizeof(V)) bind_error(a, index, param, "is smaller than the parameter's type");
    return *reinterpret_cast<V*>(b.ptr);
  }
}

template <class T>
T bind_builtin(Builtin which) {
  const uint3_t v = builtin(which);
  using U = std::remove_cv_t<std::remove_reference_t<T>>;
  if constexpr (std::is_arithmetic_v<U>) {
    return U(v.x);
  } else if constexpr (U::size == 2) {
    return U(v.x, v.y);
  } else {
    return U(v.x, v.y, v.z);
  }
}

}  // namespace metal_emu
