"""The host dispatchers (csrc/ops) and the instantiated kernels (shaders/*.metal) agree."""

from __future__ import annotations

from metal_marlin_torch import emulator
from metal_marlin_torch import formats as F

from .conftest import needs_emulator

pytestmark = needs_emulator


def test_every_host_kernel_name_is_instantiated(emu):
    host = set(emulator.host_kernel_names())
    kernels = set(emulator.kernel_names())
    missing = sorted(host - kernels)
    assert not missing, f"host code can ask for kernels that do not exist: {missing[:10]}"
    unused = sorted(kernels - host)
    assert not unused, f"kernels no host code dispatches: {unused[:10]}"


def test_dequantize_names_cover_the_python_format_table(emu):
    # The C++ format table and the .metal instantiation rows follow metal_marlin_torch.formats.
    expect = {
        f"marlin_dequantize_{name}_{dt}_gs{'K' if g == -1 else g}"
        for name, fmt in F.FORMATS.items()
        for g in fmt.group_sizes
        for dt in ("float16", "bfloat16", "float32")
    }
    got = {n for n in emulator.host_kernel_names() if n.startswith("marlin_dequantize_")}
    assert got == expect


def test_names_spell_template_parameters():
    # marlin_{op}_{fmt}_{dtype}_gs{G}: e.g. the brief's example
    assert "marlin_dequantize_fp4_float16_gs128" in emulator.kernel_names()
    assert "marlin_hadamard_bfloat16_b4096" in emulator.kernel_names()
    assert "marlin_fake_quantize_block_float32" in emulator.kernel_names()
