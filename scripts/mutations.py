"""Mutation suite: plant realistic one-line bugs in the kernels and host code, one at a time, and
check that the emulator tests catch each (issue 17, item 5).

Each mutant in MUTANTS is one edit (an exact snippet and its replacement) of a file in shaders/,
csrc/ops/ or csrc/metal/, with the tests that should catch it. For each, the script copies the
repository (tracked and untracked-not-ignored files) over ONE fixed scratch directory, applies the
edit there, runs the tests in it, and records the outcome:

    caught          the tests fail (first failure kept as evidence)
    NOT CAUGHT      the tests pass: a test is missing
    equivalent      the tests pass and the mutant is marked equivalent, with the reason why it
                    cannot change behaviour
    does not apply  the snippet is not in the file exactly once (the code moved: re-target it)
    does not build  the mutant does not compile: a bad mutant, fix the table
    timeout         the tests did not finish in --timeout seconds

The scratch path never changes, so the emulator's object cache (keyed by source text, which
names the files' paths, and kept in a dedicated METAL_MARLIN_EMU_CACHE) recompiles only what the
mutated file feeds. A kernel-header mutant still costs about a minute of clang on 2 cores.

Results go to benchmarks/results/mutations.json and .md after every mutant (atomically), so an
interrupted run keeps its finished rows; --resume skips mutants whose row is already there with
the same definition. CI does not run this (minutes per mutant).

    python scripts/mutations.py                 # every mutant
    python scripts/mutations.py --only gemm-barrier-loop x-wide-no-offset-check
    python scripts/mutations.py --resume        # continue an interrupted run
    python scripts/mutations.py --list          # the table, nothing run
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

try:
    from tqdm import tqdm
except ImportError:  # progress bars are a convenience
    tqdm = None

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from metal_marlin_torch._files import write_atomic  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
DEFAULT_SCRATCH = Path(tempfile.gettempdir()) / f"metal_marlin_mutations-{os.getuid()}"

GEMM = "tests/metal/test_gemm_emu.py"
DEQ = "tests/metal/test_dequantize.py"
FQ = "tests/metal/test_fake_quantize.py"
HAD = "tests/metal/test_hadamard.py"
KV = "tests/metal/test_kv.py"


@dataclass(frozen=True)
class Mutant:
    """One planted bug.

    `old` is the exact text replaced by `new` in `file`; it must occur exactly once. Where the
    code has moved between versions, `alternatives` lists further (file, old, new) edits tried in
    order when the first does not apply. `tests` are pytest arguments (paths, node ids, -k).
    `equivalent` says why the mutant cannot change behaviour, when it cannot; `note` why a
    mutant that does change behaviour is still NOT CAUGHT here.
    """

    id: str
    cls: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    equivalent: str = ""
    alternatives: tuple[tuple[str, str, str], ...] = field(default=())
    note: str = ""  # shown for a mutant left NOT CAUGHT on purpose (why, and what will catch it)

    def edits(self) -> list[tuple[str, str, str]]:
        return [(self.file, self.old, self.new), *self.alternatives]

    def digest(self) -> str:
        """Of what decides the test result (not the id, class or explanations)."""
        key = [self.file, self.old, self.new, list(self.tests), [list(a) for a in self.alternatives]]
        return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


BARRIER = "threadgroup_barrier(mem_flags::mem_threadgroup);"

MUTANTS: list[Mutant] = [
    # ---- races: barriers of threadgroup-memory exchanges removed -----------------------------
    Mutant("gemm-barrier-prologue", "race", "shaders/gemm.h",
           f"  loader.stash(xs, ws);\n  {BARRIER}\n",
           "  loader.stash(xs, ws);\n",
           (GEMM, "-k", "every_format_group_and_dtype and 9 or split_k or m_sweep")),
    Mutant("gemm-barrier-loop", "race", "shaders/gemm.h",
           f"    if (more) loader.stash(xs + (cur ^ 1u) * x_stage, ws + (cur ^ 1u) * w_stage);\n    {BARRIER}\n",
           "    if (more) loader.stash(xs + (cur ^ 1u) * x_stage, ws + (cur ^ 1u) * w_stage);\n",
           (GEMM, "-k", "every_format_group_and_dtype and 9 or split_k or m_sweep")),
    Mutant("gemm-barrier-epilogue", "race", "shaders/gemm.h",
           f"GemmTile::BN + sn + 8 * j, GemmTile::BN);\n  {BARRIER}\n",
           "GemmTile::BN + sn + 8 * j, GemmTile::BN);\n",
           (GEMM, "-k", "every_format_group_and_dtype and 9 or split_k or m_sweep")),
    Mutant("fq-block-barrier-load", "race", "shaders/fake_quantize.h",
           f"  for (uint i = tid; i < count; i += FQ_THREADS) tile[i] = float(x[start + i]);\n  {BARRIER}\n",
           "  for (uint i = tid; i < count; i += FQ_THREADS) tile[i] = float(x[start + i]);\n",
           (FQ,)),
    Mutant("fq-block-barrier-store", "race", "shaders/fake_quantize.h",
           f"tile[k] = fake_quantize_one(tile[k], args.steps);\n  }}\n  {BARRIER}\n",
           "tile[k] = fake_quantize_one(tile[k], args.steps);\n  }\n",
           (FQ,)),
    Mutant("hadamard-barrier-store", "race", "shaders/hadamard.h",
           f"    for (int r = 0; r < S::R; ++r) mine[r * S::TR + t] = v[r];\n    {BARRIER}\n",
           "    for (int r = 0; r < S::R; ++r) mine[r * S::TR + t] = v[r];\n",
           (HAD, "-k", "bitwise")),
    Mutant("hadamard-barrier-reuse", "race", "shaders/hadamard.h",
           f"      v[r] = (t & h) ? p - v[r] : v[r] + p;\n    }}\n    {BARRIER}\n  }}\n",
           "      v[r] = (t & h) ? p - v[r] : v[r] + p;\n    }\n  }\n",
           (HAD, "-k", "bitwise")),
    Mutant("kv-quantize-barrier-fwht", "race", "shaders/kv.h",
           f"      tile[i + h] = p - q;\n    }}\n    {BARRIER}\n",
           "      tile[i + h] = p - q;\n    }\n",
           (KV, "-k", "quantize_matches")),
    Mutant("kv-quantize-barrier-norm", "race", "shaders/kv.h",
           f"      if (e % B < s) sq[e] += sq[e + s];\n    }}\n    {BARRIER}\n",
           "      if (e % B < s) sq[e] += sq[e + s];\n    }\n",
           (KV, "-k", "quantize_matches")),
    Mutant("kv-attention-barrier-merge", "race", "shaders/kv.h",
           f"    for (uint i = 0; i < EPL; ++i) sacc[sgid * D + lane + 32 * i] = acc[g][i];\n    {BARRIER}\n",
           "    for (uint i = 0; i < EPL; ++i) sacc[sgid * D + lane + 32 * i] = acc[g][i];\n",
           (KV, "-k", "attention_matches")),
    Mutant("kv-attention-barrier-reuse", "race", "shaders/kv.h",
           f"      part_l[part] = total;\n    }}\n    {BARRIER}  // before the next head reuses sm, sl, sacc\n",
           "      part_l[part] = total;\n    }\n",
           (KV, "-k", "attention_matches")),
    # ---- vector-load alignment decided by the host ------------------------------------------
    Mutant("x-wide-no-offset-check", "alignment", "csrc/ops/gemm.cpp",
           "args.x_wide_loads = K % 8 == 0 && x2.storage_offset() % 8 == 0 ? 1u : 0u;",
           "args.x_wide_loads = K % 8 == 0 ? 1u : 0u;",
           (GEMM, "-k", "storage_offsets or unaligned")),
    Mutant("x-wide-no-k-check", "alignment", "csrc/ops/gemm.cpp",
           "args.x_wide_loads = K % 8 == 0 && x2.storage_offset() % 8 == 0 ? 1u : 0u;",
           "args.x_wide_loads = x2.storage_offset() % 8 == 0 ? 1u : 0u;",
           (GEMM, "-k", "padding or m_sweep")),  # rows misaligned only for K % 4 != 0 (K = 102)
    Mutant("w-wide-no-offset-check", "alignment", "csrc/ops/gemm.cpp",
           "f.bits == 8 && w.words % 2 == 0 && wc.storage_offset() % 2 == 0 ? 1u : 0u;",
           "f.bits == 8 && w.words % 2 == 0 ? 1u : 0u;",
           (GEMM, "-k", "8bit_pieces_at_storage_offsets")),
    Mutant("w-wide-no-row-check", "alignment", "csrc/ops/gemm.cpp",
           "f.bits == 8 && w.words % 2 == 0 && wc.storage_offset() % 2 == 0 ? 1u : 0u;",
           "f.bits == 8 && wc.storage_offset() % 2 == 0 ? 1u : 0u;",
           (GEMM, "-k", "8bit_pieces_at_storage_offsets or padding")),
    Mutant("fq-no-misaligned-copy", "alignment", "csrc/ops/fake_quantize.cpp",
           "  if (xc.storage_offset() % 4 != 0) xc = xc.clone();\n", "",
           (FQ,)),
    # ---- data the tests used to lack ----------------------------------------------------------
    Mutant("gemv-bias-kind", "data: scale/bias dtypes", "shaders/gemm.h",
           "    if (Fmt::affine) sb.y = load_scale(biases, g, bias_kind);",
           "    if (Fmt::affine) sb.y = load_scale(biases, g, scale_kind);",
           (GEMM, "-k", "different_dtypes")),  # group_params: gemv and gemv_rows, grouped
    Mutant("gemv-channel-bias-kind", "data: scale/bias dtypes", "shaders/gemm.h",
           "if (Fmt::affine) y = fma(load_scale(biases, n, args.bias_kind), xsum_row, y);",
           "if (Fmt::affine) y = fma(load_scale(biases, n, args.scale_kind), xsum_row, y);",
           (GEMM, "-k", "different_dtypes")),  # gemv, per-channel
    Mutant("gemv-rows-bias-kind", "data: scale/bias dtypes", "shaders/gemm.h",
           "args.scale_kind, args.bias_kind, ok && lane == gl.leader, gl.leader);",
           "args.scale_kind, args.scale_kind, ok && lane == gl.leader, gl.leader);",
           (GEMM, "-k", "different_dtypes")),
    Mutant("gemm-bias-kind", "data: scale/bias dtypes", "shaders/gemm.h",
           "if (Fmt::affine) sbreg.y = load_scale(biases, g, bias_kind);",
           "if (Fmt::affine) sbreg.y = load_scale(biases, g, scale_kind);",
           (GEMM, "-k", "different_dtypes")),
    Mutant("dequantize-bias-kind", "data: scale/bias dtypes", "shaders/dequantize.h",
           "v = q[i] * s + load_scale(biases, g, args.bias_kind);",
           "v = q[i] * s + load_scale(biases, g, args.scale_kind);",
           (DEQ, "-k", "scale_dtypes or different_dtypes")),
    Mutant("host-bias-kind", "data: scale/bias dtypes", "csrc/ops/weight_args.cpp",
           'w.bias_kind = scale_kind(op, f, *biases, "biases");',
           "w.bias_kind = w.scale_kind;",
           (GEMM, DEQ, "-k", "different_dtypes or scale_dtypes")),
    Mutant("gemm-no-zero-past-k", "data: padding", "shaders/gemm.h",
           "        v[j] = k0 + j < k_end ? (Fmt::affine ? fma(v[j], se, sb.y) : v[j] * se) : 0.0f;",
           "        v[j] = Fmt::affine ? fma(v[j], se, sb.y) : v[j] * se;",
           (GEMM, "-k", "padding or split_k")),
    Mutant("gemv-no-clear-padding", "data: padding", "shaders/gemm.h",
           "for (uint i = 0; i < 8; ++i) d = fma(x[i], i < valid ? q[i] : 0.0f, d);",
           "for (uint i = 0; i < 8; ++i) d = fma(x[i], q[i], d);",
           (GEMM, "-k", "padding")),
    Mutant("gemv-rows-no-clear-padding", "data: padding", "shaders/gemm.h",
           "        v[j] = j < valid ? (Fmt::affine ? fma(v[j], se, sb.y) : v[j] * se) : 0.0f;",
           "        v[j] = Fmt::affine ? fma(v[j], se, sb.y) : v[j] * se;",
           (GEMM, "-k", "padding")),
    Mutant("gemm-half-accumulators", "data: long K", "shaders/gemm.h",
           "  simdgroup_matrix<float, 8, 8> acc[2][2];\n  for (int i = 0; i < 2; ++i)\n"
           "    for (int j = 0; j < 2; ++j) acc[i][j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);",
           "  simdgroup_matrix<half, 8, 8> acc[2][2];\n  for (int i = 0; i < 2; ++i)\n"
           "    for (int j = 0; j < 2; ++j) acc[i][j] = make_filled_simdgroup_matrix<half, 8, 8>(half(0.0f));",
           (GEMM, "-k", "long_k_reduction")),
    Mutant("gemv-half-accumulators", "data: long K", "shaders/gemm.h",
           "  float acc[R];\n  for (int i = 0; i < R; ++i) acc[i] = 0.0f;",
           "  half acc[R];\n  for (int i = 0; i < R; ++i) acc[i] = 0.0f;",
           (GEMM, "-k", "every_format_group_and_dtype or long_k_decode")),
    Mutant("gemv-rows-half-accumulators", "data: long K", "shaders/gemm.h",
           "  float acc[ROWS][R];", "  half acc[ROWS][R];",
           (GEMM, "-k", "m_sweep or long_k_decode")),
    Mutant("gemm-reduce-half", "data: long K", "shaders/gemm.h",
           "  float s = 0.0f;\n  for (uint p = 0; p < args.splits; ++p) s += partials[ulong(p) * total + idx];\n"
           "  if (args.has_bias) s += bias[idx % args.n];\n  out[idx] = T(s);",
           "  half s = 0.0f;\n  for (uint p = 0; p < args.splits; ++p) s += partials[ulong(p) * total + idx];\n"
           "  if (args.has_bias) s += bias[idx % args.n];\n  out[idx] = T(float(s));",  # bfloat(half) does not compile
           (GEMM, "-k", "split_k")),
    # ---- code that never runs here (Objective-C++ glue) -------------------------------------
    Mutant("bind-offset-in-elements", "never runs here", "csrc/ops/launcher.h",
           "const size_t byte_offset = size_t(t.storage_offset()) * t.element_size();",
           "const size_t byte_offset = size_t(t.storage_offset());",
           (GEMM, FQ, DEQ, KV, "-k", "storage_offsets or unaligned or offset"),
           alternatives=(("csrc/metal/metal_launcher.mm",
                          "offset:b.tensor.storage_offset() * b.tensor.element_size()",
                          "offset:b.tensor.storage_offset()"),),
           # The byte offset is computed in csrc/ops/launcher.h (Binding), which the emulator's
           # launcher runs too; the .mm edit is where it lived before ("Metal trust 2"), when this
           # mutant ran only on macOS and was NOT CAUGHT here.
           note="the byte offset is computed in shared host code the emulator runs: a pass is a test gap"),
    # ---- bounds, indices, reductions, bit twiddling ------------------------------------------
    Mutant("gemv-rows-drop-row", "off by one", "shaders/gemm.h",
           "const uint rows = min(uint(ROWS), args.m - m0);",
           "const uint rows = min(uint(ROWS) - 1u, args.m - m0);",
           (GEMM, "-k", "m_sweep")),
    Mutant("load-piece-tail-bound", "off by one", "shaders/gemm.h",
           "      if (first + j < row_bytes) v[j / 4] |= uint(p[j]) << (8 * (j % 4));",
           "      if (first + j <= row_bytes) v[j / 4] |= uint(p[j]) << (8 * (j % 4));",
           (GEMM, "-k", "padding or every_format_group_and_dtype")),
    Mutant("load-piece-full-bound", "off by one", "shaders/gemm.h",
           "  if (first + bits <= row_bytes) {\n    PieceLoad<bits>::run(p, wide, w);",
           "  if (first + bits < row_bytes) {\n    PieceLoad<bits>::run(p, wide, w);",
           (GEMM, "-k", "padding or every_format_group_and_dtype"),
           equivalent="a full last piece then takes the byte-by-byte tail path, which reads the same bytes"),
    Mutant("dequantize-count", "off by one", "shaders/dequantize.h",
           "const uint count = min(32u, args.k - k0);", "const uint count = min(31u, args.k - k0);",
           (DEQ,)),
    Mutant("fq-vec-tail-bound", "off by one", "shaders/fake_quantize.h",
           "  if (base + 4 <= args.n) {", "  if (base + 4 < args.n) {",
           (FQ,),
           equivalent="a full last 4-vector then goes through the scalar tail loop: same values"),
    Mutant("gemv-group-of-piece", "group index", "shaders/gemm.h",
           "const uint g = n * args.groups_per_row + k0 / uint(group_size);",
           "const uint g = n * args.groups_per_row + piece / uint(group_size);",
           (GEMM, "-k", "every_format_group_and_dtype and 1")),
    Mutant("gemv-group-leader", "group index", "shaders/gemm.h",
           "min(uint(group_size) / GemvShape::PIECE, g.lanes) : g.lanes;",
           "g.lanes : g.lanes;",
           (GEMM, "-k", "every_format_group_and_dtype and 1")),
    Mutant("gemm-group-row", "group index", "shaders/gemm.h",
           "const uint g = wn * groups_per_row + (group_size > 0 ? k0 / uint(group_size) : 0u);",
           "const uint g = wn + (group_size > 0 ? k0 / uint(group_size) : 0u);",
           (GEMM, "-k", "every_format_group_and_dtype and 9")),
    Mutant("gemm-group-leader", "group index", "shaders/gemm.h",
           "min(uint(group_size) / 8u, uint(GemmTile::PIECES))",
           "uint(GemmTile::PIECES)",
           (GEMM, "-k", "every_format_group_and_dtype and 9 and nvfp4")),
    Mutant("dequantize-group", "group index", "shaders/dequantize.h",
           "(group_size > 0 ? (k0 + i) / uint(group_size) : 0u)",
           "(group_size > 0 ? k0 / uint(group_size) : 0u)",
           (DEQ, "-k", "every_format")),
    Mutant("gemv-no-simd-sum", "missing simd_sum", "shaders/gemm.h",
           "  if (lanes == 32) return simd_sum(v);", "  if (lanes == 32) return v;",
           (GEMM, "-k", "every_format_group_and_dtype and 1 or long_k_decode")),
    Mutant("gemv-segment-sum-short", "missing simd_sum", "shaders/gemm.h",
           "for (ushort off = ushort(lanes / 2); off > 0; off >>= 1)",
           "for (ushort off = ushort(lanes / 4); off > 0; off >>= 1)",
           (GEMM, "-k", "lane_split or every_format_group_and_dtype and 1")),
    Mutant("gemv-rows-no-simd-sum", "missing simd_sum", "shaders/gemm.h",
           "      const float y = segment_sum(acc[r][i], gl.lanes);", "      const float y = acc[r][i];",
           (GEMM, "-k", "m_sweep or long_k_decode")),
    Mutant("kv-attention-no-simd-sum", "missing simd_sum", "shaders/kv.h",
           "const float s = simd_sum(dot) * a.scale;", "const float s = dot * a.scale;",
           (KV, "-k", "attention_matches")),
    Mutant("int-decode-shift", "wrong shift", "shaders/formats/int.h",
           "const uint x = ((w >> (bits_ * s)) & mask) | 0x64006400u;",
           "const uint x = ((w >> (bits_ * s + 1)) & mask) | 0x64006400u;",
           (GEMM, DEQ, "-k", "every_format_group_and_dtype and int")),
    Mutant("int-qdot-mask-shift", "wrong shift", "shaders/gemm.h",
           "const uint mask = ((1u << b) - 1u) << (b * (i % PER_HALF));",
           "const uint mask = ((1u << b) - 1u) << (b * (i % PER_WORD));",
           (GEMM, "-k", "every_format_group_and_dtype and int")),
    Mutant("int3-straddle", "wrong shift", "shaders/formats/decode.h",
           "if (shift > 29) code |= w[word + 1] << (32 - shift);",
           "if (shift > 30) code |= w[word + 1] << (32 - shift);",
           (DEQ, "-k", "int3 or nf3")),
    Mutant("e2m1-exponent-shift", "wrong shift", "shaders/formats/fp4_e2m1.h",
           "const uint bits = ((x & 0x00080008u) << 12) | ((x & 0x00070007u) << 9);",
           "const uint bits = ((x & 0x00080008u) << 12) | ((x & 0x00070007u) << 8);",
           (DEQ, "-k", "fp4 or e2m1")),
    Mutant("kv-nibble-order", "wrong shift", "shaders/kv.h",
           "return (e & 1u) ? (byte >> 4) : (byte & 0xFu);",
           "return (e & 1u) ? (byte & 0xFu) : (byte >> 4);",
           (KV, "-k", "dequantize_seq_is_bitwise")),
    Mutant("hadamard-shuffle-partner", "wrong shift", "shaders/hadamard.h",
           "const float p = simd_shuffle_xor(v[r], ushort(h));",
           "const float p = simd_shuffle_xor(v[r], ushort(h << 1));",
           (HAD, "-k", "bitwise")),
    Mutant("gemm-reduce-drop-split", "off by one", "shaders/gemm.h",
           "for (uint p = 0; p < args.splits; ++p) s += partials",
           "for (uint p = 0; p + 1 < args.splits; ++p) s += partials",
           (GEMM, "-k", "split_k")),
    Mutant("gemm-split-end-unclamped", "off by one", "shaders/gemm.h",
           "const uint k_end = min(args.k, k_begin + args.k_per_split);",
           "const uint k_end = k_begin + args.k_per_split;",
           (GEMM, "-k", "split_k or padding")),
    Mutant("host-gemv-grid-rows", "off by one", "csrc/ops/gemm.cpp",
           "launcher.dispatch_threadgroups({n_groups, uint32_t(M), 1}, {kGemvThreads, 1, 1});",
           "launcher.dispatch_threadgroups({n_groups - 1, uint32_t(M), 1}, {kGemvThreads, 1, 1});",
           (GEMM, "-k", "every_format_group_and_dtype and 1")),
    Mutant("host-hadamard-grid", "off by one", "csrc/ops/hadamard.cpp",
           "launcher.dispatch_threadgroups({ceil_div(rows, per_group), 1, 1}, {kThreads, 1, 1});",
           "launcher.dispatch_threadgroups({uint32_t(rows / per_group), 1, 1}, {kThreads, 1, 1});",
           (HAD,)),
    Mutant("fq-nan-select", "special values", "shaders/fake_quantize.h",
           "return select(select(q, sign, steps == 0.0f), x, isnan(x));",
           "return select(q, sign, steps == 0.0f);",
           (FQ, "-k", "matches_torch")),
    Mutant("kv-dequantize-start", "wrong index", "shaders/kv.h",
           "const ulong slot = ulong(row) * a.capacity + a.start + i;",
           "const ulong slot = ulong(row) * a.capacity + i;",
           (KV, "-k", "dequantize_seq or seq_n")),
]


# ---------------------------------------------------------------------------------------------
# Scratch copy and one mutant's run.


def snapshot(root: Path, rev: str) -> dict[str, bytes]:
    """Every file of commit `rev` (path -> bytes), read once: the run tests that commit, not a
    working tree that may change while it runs."""
    names = subprocess.run(["git", "-C", str(root), "ls-tree", "-r", "-z", "--name-only", rev],
                           capture_output=True, check=True).stdout.decode().split("\0")
    names = [n for n in names if n]
    req = "".join(f"{rev}:{n}\n" for n in names).encode()
    out = subprocess.run(["git", "-C", str(root), "cat-file", "--batch"], input=req, capture_output=True,
                         check=True).stdout
    files, pos = {}, 0
    for n in names:
        header_end = out.index(b"\n", pos)
        header = out[pos:header_end].split()
        if header[-1] == b"missing":  # a submodule entry
            pos = header_end + 1
            continue
        size = int(header[2])
        files[n] = out[header_end + 1 : header_end + 1 + size]
        pos = header_end + 1 + size + 1
    return files


# The emulator keys host objects (csrc/ops, csrc/emu) by a digest of every header under csrc/ and
# shaders/, so a kernel-header mutant would recompile all host files too (a minute on 2 cores).
# Host code includes only shaders/args.h and shaders/kv_args.h; in the scratch copy (never in the
# repository) the digest is narrowed to those, which changes no object's content.
_DIGEST_OLD = "digest = _header_digest(CSRC, SHADERS)"
_DIGEST_NEW = ('digest = _header_digest(CSRC) + _sha((SHADERS / "args.h").read_bytes(), '
               '(SHADERS / "kv_args.h").read_bytes())')


def sync(files: dict[str, bytes], dst: Path) -> None:
    """Make `dst` hold exactly `files` (writing only what differs, so unchanged files keep their
    bytes and the emulator cache its objects)."""
    manifest = dst / ".mutation-manifest.json"
    old = set(json.loads(manifest.read_text())) if manifest.exists() else set()
    for rel in old - set(files):
        (dst / rel).unlink(missing_ok=True)
    for rel, data in files.items():
        d = dst / rel
        if rel == "metal_marlin_torch/emulator.py" and data.count(_DIGEST_OLD.encode()) == 1:
            data = data.replace(_DIGEST_OLD.encode(), _DIGEST_NEW.encode())
        if d.exists() and d.read_bytes() == data:
            continue
        d.parent.mkdir(parents=True, exist_ok=True)
        d.write_bytes(data)
    manifest.write_text(json.dumps(sorted(files)))


def apply(m: Mutant, root: Path) -> tuple[str, str] | None:
    """Apply the first of the mutant's edits that matches exactly once; returns (file, old)."""
    for rel, old, new in m.edits():
        path = root / rel
        if not path.exists():
            continue
        text = path.read_text()
        if text.count(old) == 1:
            path.write_text(text.replace(old, new))
            return rel, old
    return None


_FAILED = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.M)


def run_tests(root: Path, tests: Sequence[str], cache: Path, timeout: float) -> tuple[str, str, float]:
    """Runs pytest in `root`; returns (outcome, evidence, seconds), outcome one of
    'pass', 'fail', 'build', 'timeout', 'error'."""
    env = dict(os.environ, METAL_MARLIN_EMU_CACHE=str(cache), PYTHONDONTWRITEBYTECODE="1")
    env.pop("METAL_MARLIN_EMU_ORDER", None)  # the tests pick their schedules
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider", *tests]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", f"no result in {timeout:.0f} s", time.monotonic() - t0
    secs = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    if "EmulatorError" in out and re.search(r"compiling \S+ failed", out):
        err = re.search(r"(error: .*)", out)
        return "build", err.group(1)[:200] if err else "compile error", secs
    if proc.returncode == 0:
        return "pass", "", secs
    if proc.returncode == 1:
        first = _FAILED.search(out)
        msg = re.search(r"^E\s+(.+)$", out, re.M)
        ev = (first.group(1) if first else "failed") + (f": {msg.group(1)[:160]}" if msg else "")
        return "fail", ev, secs
    return "error", f"pytest exit {proc.returncode}: {out.strip().splitlines()[-1][:200] if out.strip() else ''}", secs


def inputs_digest(m: Mutant, files: dict[str, bytes]) -> str:
    """The mutant's definition with the files it edits and the test files it runs: --resume
    re-runs a mutant when any of them changed."""
    h = hashlib.sha256(m.digest().encode())
    for rel in sorted({f for f, _, _ in m.edits()} | {t.split("::")[0] for t in m.tests if t.startswith("tests/")}):
        h.update(rel.encode() + b"\0" + files.get(rel, b"") + b"\0")
    return h.hexdigest()[:16]


def code_digest(m: Mutant, files: dict[str, bytes]) -> str:
    """The mutant's definition with the files it edits (not its tests): a row whose code
    digest differs from the tested commit's ran on other sources."""
    h = hashlib.sha256(m.digest().encode())
    for rel in sorted({f for f, _, _ in m.edits()}):
        h.update(rel.encode() + b"\0" + files.get(rel, b"") + b"\0")
    return h.hexdigest()[:16]


def outcome(m: Mutant, result: str) -> str:
    if result == "fail":
        return "caught"
    if result == "pass":
        return "equivalent" if m.equivalent else "NOT CAUGHT"
    return {"build": "does not build", "timeout": "timeout"}.get(result, "error")


# ---------------------------------------------------------------------------------------------
# Results.


def git_rev(root: Path, rev: str) -> str:
    out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", rev], capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()



def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def write_results(rows: list[dict], meta: dict, out_dir: Path) -> None:
    order = {m.id: i for i, m in enumerate(MUTANTS)}
    rows = sorted(rows, key=lambda r: order.get(r["id"], len(order)))
    write_atomic(out_dir / "mutations.json", json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    commits = sorted({r.get("commit", meta["commit"]) for r in rows})
    lines = [
        "# Mutation suite (scripts/mutations.py)",
        "",
        f"Machine: {meta['machine']}. Rows ran at commit(s) {', '.join(commits)} (last run {meta['date']}; a row "
        "is re-run by --resume when its edit, the edited file or its test files change). "
        "Each row is one planted bug applied alone to a scratch copy; the listed tests were run "
        "(pytest -x, the schedules of tests/metal/conftest.py); a row marked '(older sources)' ran before "
        "the file it edits last changed, and is re-run by --resume (as is a row whose tests changed). Outcomes: "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + f" (of {len(rows)}).",
        "",
        "| id | class | file | planted change | tests | outcome | evidence / reason | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(_cell(str(c)) for c in (
            r["id"], r["class"], r["file"], r["change"], r["tests"],
            f"**{r['outcome']}**" + (" (older sources)" if r.get("stale") else ""),
            r["evidence"], f"{r['seconds']:.0f}")) + " |")
    write_atomic(out_dir / "mutations.md", "\n".join(lines) + "\n")


def describe(old: str, new: str) -> str:
    """A one-line view of an edit for the table."""
    o = " ".join(old.split())
    n = " ".join(new.split())
    if not n:
        return f"removed `{o[:90]}`"
    return f"`{o[:70]}` -> `{n[:70]}`"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help="mutant ids to run (default: all)")
    ap.add_argument("--rev", default="HEAD", help="commit to test (default HEAD; uncommitted edits are not used)")
    ap.add_argument("--resume", action="store_true", help="keep rows of unchanged mutants from the last run")
    ap.add_argument("--scratch", type=Path, default=DEFAULT_SCRATCH,
                    help=f"fixed scratch directory (default {DEFAULT_SCRATCH})")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant's test run")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where mutations.json/.md go")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of every test selection")
    ap.add_argument("--list", action="store_true", help="print the table of mutants and exit")
    args = ap.parse_args(argv)

    ids = [m.id for m in MUTANTS]
    for m in MUTANTS:  # pytest keeps only the last -k: one expression per mutant
        if m.tests.count("-k") > 1:
            raise SystemExit(f"{m.id}: give one -k expression, not {m.tests.count('-k')}")
    dupes = {i for i in ids if ids.count(i) > 1}
    if dupes:
        raise SystemExit(f"duplicate mutant ids: {sorted(dupes)}")
    by_id = {m.id: m for m in MUTANTS}
    # --only runs in the order given (most important first, for a run that may be cut short).
    chosen = [by_id[i] for i in dict.fromkeys(args.only) if i in by_id] if args.only else list(MUTANTS)
    unknown = set(args.only or ()) - set(ids)
    if unknown:
        raise SystemExit(f"--only: unknown mutant ids {sorted(unknown)}")
    if args.list:
        for m in chosen:
            print(f"{m.id:28s} {m.cls:26s} {m.file:28s} {' '.join(m.tests)}")
        return 0

    repo_dir = args.scratch / "repo"
    cache = args.scratch / "emu-cache"
    repo_dir.mkdir(parents=True, exist_ok=True)
    files = snapshot(REPO, args.rev)
    meta = {"machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, Linux), MSL emulator",
            "commit": git_rev(REPO, args.rev), "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    rows: list[dict] = []
    old_json = args.out / "mutations.json"
    if (args.resume or args.only) and old_json.exists():
        prev = json.loads(old_json.read_text())["rows"]
        digests = {m.id: inputs_digest(m, files) for m in MUTANTS}
        # Every row stays until a new result replaces it (an interrupted run loses none); rows
        # whose code changed since they ran are marked stale, and --resume re-runs those.
        at: dict[str, dict[str, bytes]] = {}
        current: set[str] = set()
        for r in prev:
            if r["id"] not in digests:
                continue
            m = by_id[r["id"]]
            if r.get("digest") == digests[r["id"]]:
                rows.append(dict(r, stale=False))
                current.add(r["id"])
                continue
            try:
                old_files = at.setdefault(r["commit"], snapshot(REPO, r["commit"]))
            except subprocess.CalledProcessError:  # a commit that is gone
                old_files = {}
            rows.append(dict(r, stale=code_digest(m, old_files) != code_digest(m, files)))
        if args.resume:  # skip the chosen mutants that already have a current row
            chosen = [m for m in chosen if m.id not in current]

    if not args.no_baseline:
        # The unmutated tests must pass, or every mutant would look caught.
        sync(files, repo_dir)
        # One run of every test file the chosen mutants name (their -k selections are subsets).
        test_files = sorted({t for m in chosen for t in m.tests if t.startswith("tests/")})
        print(f"baseline: {' '.join(test_files)}", flush=True)
        res, ev, secs = run_tests(repo_dir, test_files, cache, args.timeout * 2)
        if res != "pass":
            raise SystemExit(f"baseline fails (unmutated): {res} {ev}")
        print(f"baseline passed in {secs:.0f} s", flush=True)

    bar = tqdm(chosen, desc="mutants", unit="mutant") if tqdm else chosen
    try:
        for m in bar:
            if tqdm:
                bar.set_postfix_str(m.id)
            sync(files, repo_dir)
            applied = apply(m, repo_dir)
            row = {"id": m.id, "class": m.cls, "file": m.file, "change": describe(m.old, m.new),
                   "tests": " ".join(m.tests), "digest": inputs_digest(m, files), "commit": meta["commit"],
                   "seconds": 0.0}
            if applied is None:
                row.update(outcome="does not apply", evidence="snippet not found exactly once: re-target it")
            else:
                rel, old = applied
                new = next(n for f, o, n in m.edits() if f == rel and o == old)
                row.update(file=rel, change=describe(old, new))
                res, ev, secs = run_tests(repo_dir, m.tests, cache, args.timeout)
                row.update(outcome=outcome(m, res), seconds=round(secs, 1),
                           evidence=(m.equivalent or m.note) if res == "pass" else ev)
                if res == "fail" and m.equivalent:
                    row["evidence"] = f"marked equivalent, but caught: {ev}"
            rows = [r for r in rows if r["id"] != m.id] + [row]
            write_results(rows, meta, args.out)
            if not tqdm:
                print(f"{m.id}: {row['outcome']} {row['evidence']}", flush=True)
    except KeyboardInterrupt:
        print("interrupted: finished rows are in", args.out / "mutations.md", file=sys.stderr)
        return 130
    finally:
        sync(files, repo_dir)  # leave the scratch copy unmutated
    counts = {}
    for r in rows:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    print(", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
