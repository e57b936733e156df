"""GGUF import on blocks made by llama.cpp's own quantizers: exactness, and the error of ``--compact``.

llama.cpp's reference quantizers (``quantize_q4_K`` ..., ``ggml/src/ggml-quants.c``, the code
``llama-quantize`` calls, without an importance matrix) are compiled from a llama.cpp source tree
into a small shared library (one C file, a few seconds) and run on the ``down_proj`` weights of
pylm-s (6 matrices of 384 x 1024, trained bf16 weights; K = 1024 because the K-quants need
K % 256 == 0). For every type: does the default import dequantize to exactly
``gguf.quants.dequantize`` (bit for bit), and what relative RMS error does ``compact=True`` (or,
for the types without an exact mapping, the default re-quantization) add. Writes
``benchmarks/results/gguf_import_error.{json,md}``.

    pip download llama-cpp-python --no-deps --no-binary :all: -d /tmp/llcpp && tar xzf /tmp/llcpp/*.tar.gz -C /tmp/llcpp
    PYTHONPATH=. python3 benchmarks/gguf_import_error.py --llama-cpp /tmp/llcpp/llama_cpp_python-*/vendor/llama.cpp
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_common import RESULTS, machine, md_table, models_dir, write_json, write_text  # noqa: E402

from metal_marlin_torch import formats as F  # noqa: E402
from metal_marlin_torch.io.gguf_import import convert_tensor  # noqa: E402

# the four symbols ggml-quants.c needs from the rest of ggml; the quantizers used here only call
# ggml_row_size for their return value (ignored) and ggml_abort on a broken invariant
STUBS = r"""
#include <stdio.h>
#include <stdlib.h>
#include <stddef.h>
#include <stdint.h>
void ggml_abort(const char * file, int line, const char * fmt, ...) {
  fprintf(stderr, "abort %s:%d\n", file, line); abort();
}
size_t ggml_row_size(int type, int64_t ne) { (void)type; return (size_t)ne; }
const char * ggml_type_name(int type) { (void)type; return "?"; }
size_t ggml_type_size(int type) { (void)type; return 0; }
"""

TYPES = ("Q4_K", "Q5_K", "IQ4_NL", "IQ4_XS", "Q6_K", "Q3_K", "Q2_K", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS",
         "IQ3_S", "IQ1_S", "IQ1_M", "TQ2_0", "TQ1_0")
# the IQ quantizers search lattices that llama.cpp builds once per type (iq2xs_init_impl takes
# the ggml type number, iq3xs_init_impl the grid size); IQ2_XXS, IQ2_XS and IQ1_S refuse to run
# without importance weights (llama-quantize wants an imatrix for them), so every IQ type gets
# uniform weights here: the error is that of a quantization without an imatrix
IQ2_INIT = {"IQ2_XXS": 16, "IQ2_XS": 17, "IQ1_S": 19, "IQ2_S": 22, "IQ1_M": 29}
IQ3_INIT = {"IQ3_XXS": 256, "IQ3_S": 512}


def build(llama_cpp: Path, work: Path) -> ctypes.CDLL:
    src = llama_cpp / "ggml" / "src"
    (work / "stubs.c").write_text(STUBS)
    lib = work / "libggml_quants.so"
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", f"-I{src}", f"-I{llama_cpp / 'ggml' / 'include'}",
                    str(src / "ggml-quants.c"), str(work / "stubs.c"), "-o", str(lib), "-lm"], check=True)
    return ctypes.CDLL(str(lib))


def llama_quantize(lib: ctypes.CDLL, w: np.ndarray, qtype: str) -> np.ndarray:
    """``w [N, K]`` float32 as GGUF blocks of ``qtype`` by llama.cpp's ``quantize_<type>``."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: PLC0415

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    n, k = w.shape
    out = np.zeros((n, k // block * size), dtype=np.uint8)
    fn = getattr(lib, "quantize_" + qtype.lower().replace("_k", "_K"))
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    fn.restype = ctypes.c_size_t
    w = np.ascontiguousarray(w, dtype=np.float32)
    weights = None
    if qtype in IQ2_INIT:
        lib.iq2xs_init_impl(ctypes.c_int(IQ2_INIT[qtype]))
    if qtype in IQ3_INIT:
        lib.iq3xs_init_impl(ctypes.c_int(IQ3_INIT[qtype]))
    if qtype.startswith("IQ") and qtype not in ("IQ4_NL", "IQ4_XS"):
        weights = np.ones(k, dtype=np.float32)
    fn(w.ctypes.data, out.ctypes.data, n, k, None if weights is None else weights.ctypes.data)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-cpp", required=True, type=Path, help="a llama.cpp source tree")
    ap.add_argument("--models-dir", default=None)
    args = ap.parse_args()
    from gguf import GGMLQuantizationType  # noqa: PLC0415
    from gguf.quants import dequantize  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415

    sd = load_file(str(models_dir(args.models_dir) / "pylm-s" / "model.safetensors"))
    mats = [sd[k].float().numpy() for k in sorted(sd) if k.endswith("mlp.down_proj.weight")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        lib = build(args.llama_cpp, Path(tmp))
        for qtype in TYPES:
            exact_all, errs, codes_unused, target = True, [], [], ""
            for w in mats:
                data = llama_quantize(lib, w, qtype)
                ref = torch.from_numpy(dequantize(data, GGMLQuantizationType[qtype]).astype(np.float32))
                qt, rep = convert_tensor(data, qtype, w.shape)
                if rep.exact:
                    exact_all &= torch.equal(F.dequantize(qt), ref)
                    bits = qt.nbytes * 8 / w.size
                    qc, repc = convert_tensor(data, qtype, w.shape, compact=True)
                    errs.append(repc.rel_rms_error)
                    target = f"{rep.target} exact ({bits:.2f} bits/w); compact {repc.target}"
                else:
                    exact_all = False
                    errs.append(rep.rel_rms_error)
                    target = f"{rep.target} (re-quantized)"
                if qtype == "Q4_K":  # sub-blocks of 32 whose codes never reach 15 (no min/max grid)
                    b = data.reshape(-1, 144)[:, 16:].reshape(-1, 4, 32)
                    c = np.stack([b & 15, b >> 4], axis=2).reshape(-1, 32)
                    codes_unused.append(float((c.max(-1) < 15).mean()))
            rows.append({"type": qtype, "mapping": target, "default_exact": bool(exact_all),
                         "rel_rms_error_compact_or_requant": float(np.mean(errs)),
                         "max_rel_rms_error": float(np.max(errs)),
                         "q4k_subblocks_without_code_15": float(np.mean(codes_unused)) if codes_unused else None})
            print(rows[-1], flush=True)
    md = md_table(["GGUF type", "import", "default exact (bit for bit)", "mean rel. RMS error (compact / re-quantized)",
                   "worst"], [[r["type"], r["mapping"], r["default_exact"], r["rel_rms_error_compact_or_requant"],
                               r["max_rel_rms_error"]] for r in rows])
    print(md)
    data = {"machine": machine(), "source": "llama.cpp ggml-quants.c reference quantizers (no imatrix), "
            "pylm-s down_proj weights", "rows": rows}
    write_json(RESULTS / "gguf_import_error.json", data)
    write_text(RESULTS / "gguf_import_error.md", "# GGUF import on llama.cpp-quantized blocks\n\n" + md)


if __name__ == "__main__":
    main()
