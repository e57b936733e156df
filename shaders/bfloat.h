// bf16 kernels exist only where the Metal Shading Language has `bfloat`: MSL 3.1 and later
// (macOS 14+). On MSL 3.0 (macOS 13) the bf16 instantiation rows vanish, the other rows still
// compile, and the host's bf16 calls fall back to the pure-torch kernels (csrc/ops/families.h).
// The emulator and host C++ (no __METAL_VERSION__ below 310) keep them.
#pragma once

#if !defined(__METAL_VERSION__) || __METAL_VERSION__ >= 310
#define MARLIN_HAS_BFLOAT 1
#define MARLIN_IF_BFLOAT(...) __VA_ARGS__
#else
#define MARLIN_HAS_BFLOAT 0
#define MARLIN_IF_BFLOAT(...)
#endif
