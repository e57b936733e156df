"""The Mac benchmark kit runs on Linux too (CPU rows), so it is tested: tiny sizes, no timing claims."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_llama

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import bench_decode, bench_gemm  # noqa: E402

HAVE_MLX = importlib.util.find_spec("mlx") is not None


def test_bench_gemm_cpu_has_torch_int4_and_mlx_rows(tmp_path):
    out = tmp_path / "gemm.json"
    bench_gemm.main(["--device", "cpu", "--shapes", "256x128", "--m", "1,3", "--formats", "int4",
                     "--json", str(out)])
    result = json.loads(out.read_text())
    methods = {(r["method"], r["M"]) for r in result["rows"]}
    assert {("dense", 1), ("marlin", 3), ("torch int4pack", 1), ("torch int4pack", 3)} <= methods
    for r in result["rows"]:
        assert r["ms"] > 0 and r["ratio_to_dense"] > 0
        if r["method"] == "torch int4pack":
            # the same int4 weights through torch's kernel: agrees with marlin.gemm (fp32 on CPU)
            err = float(r["note"].split("marlin int4 ")[1].split()[0])
            assert err < 1e-5 and "MISMATCH" not in r["note"]
    if HAVE_MLX:
        assert ("mlx", 1) in methods


def test_bench_decode_cpu_tiny_model(tmp_path):
    model_dir = tmp_path / "tiny"
    torch.manual_seed(0)
    tiny_llama().save_pretrained(model_dir)
    out, md = tmp_path / "decode.json", tmp_path / "decode.md"
    result = bench_decode.main(["--model", str(model_dir), "--device", "cpu", "--methods", "dense,int4,fp4,mlx",
                                "--prompt", "4", "--new", "3", "--prefill", "8", "--repeats", "1", "--group", "32",
                                "--generate-repeats", "1", "--json", str(out), "--markdown", str(md)])
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(result["rows"], default=str))
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"dense", "marlin:int4", "marlin:fp4", "mlx"}
    for name in ("dense", "marlin:int4", "marlin:fp4"):
        r = rows[name]
        assert r["eager_tok_s"] > 0 and r["prefill_8_ms"] > 0
        assert len(r["tokens"]) == 3
        assert 0 <= r["agree"] <= 1
        assert "compiled_tok_s" not in r  # CPU: no compiled columns
    assert rows["dense"]["agree"] == 1.0
    # our rows run fuse_projections (q/k/v and gate/up one layer each), dense does not
    assert rows["marlin:int4"]["fused"] == {"qkv_proj": 2, "gate_up_proj": 2, "skipped": 0}
    assert "fused" not in rows["dense"]
    # 4-bit weights: the quantized linears hold about a quarter of their fp32 bytes
    assert rows["marlin:int4"]["checkpoint_bytes"] < rows["dense"]["checkpoint_bytes"]
    assert "skipped" in rows["mlx"] or rows["mlx"]["eager_tok_s"] > 0
    assert result["machine"]["load_average"] is not None
    table = md.read_text()
    assert "| marlin:int4 |" in table and "agree" in table


def test_bench_decode_eager_interleaved_rounds(tmp_path):
    model_dir = tmp_path / "tiny"
    torch.manual_seed(0)
    tiny_llama().save_pretrained(model_dir)
    out = tmp_path / "eager.json"
    result = bench_decode.main(["--model", str(model_dir), "--device", "cpu", "--methods", "dense,int4",
                                "--prompt", "4", "--new", "3", "--generate-repeats", "2",
                                "--eager-interleaved", "--json", str(out)])
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"dense", "marlin:int4"} and result["rows"][0]["x_first"] == 1.0
    for r in rows.values():  # two timed rounds each (the warm-up round is not kept)
        assert len(r["rounds_tok_s"]) == 2 and r["eager_tok_s"] > 0 and r["step_ms"] > 0


def test_bench_decode_rejects_one_token():
    with pytest.raises(SystemExit):
        bench_decode.main(["--model", "x", "--new", "1"])


def test_bench_layer_ops_cpu_rows(tmp_path):
    from benchmarks import bench_layer_ops  # noqa: PLC0415

    out = tmp_path / "layer.json"
    bench_layer_ops.main(["--device", "cpu", "--m", "1,3", "--kv", "8", "--hidden", "64", "--inter", "96",
                          "--heads", "4,2,16", "--rounds", "2", "--json", str(out)])
    result = json.loads(out.read_text())
    ops_m = {(r["op"], r["M"]) for r in result["rows"]}
    assert {("rms_norm+residual", 1), ("rope", 3), ("attention", 3), ("silu_mul", 1)} <= ops_m
    assert all(r["stock_ms"] > 0 and r["marlin_ms"] > 0 and r["kernel"] == "torch" for r in result["rows"])


def test_bench_moe_tiny_block_and_decode_counters(tmp_path):
    # tiny shapes; the counters run the emulated decode kernel: its weight reads must be exactly
    # the selected experts' packed bytes (each once), and its output equal the torch op's
    from benchmarks import bench_moe

    out = tmp_path / "moe.json"
    result = bench_moe.main(["--experts", "8", "--top-k", "2", "--hidden", "128", "--inter", "64",
                             "--group-size", "64", "--prefill-tokens", "20", "--decode-rounds", "1",
                             "--prefill-rounds", "1", "--counters", "--json", str(out)])
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    assert result["routers"] == ["gate"]
    rows = {(r["phase"], r["method"]): r for r in result["rows"]}
    assert set(rows) == {(p, m) for p in ("decode", "prefill") for m in ("dense bf16", "marlin", "oracle")}
    for (_, method), r in rows.items():
        assert r["ms"] > 0 and r["tok_s"] > 0
        assert r["rel_err_vs_dense"] < (1e-9 if method == "dense bf16" else 0.3)  # int4 g64
    # on CPU the marlin block and the oracle compute the same function
    assert abs(rows["decode", "marlin"]["rel_err_vs_dense"] - rows["decode", "oracle"]["rel_err_vs_dense"]) < 1e-2
    c = result["decode_counters"]
    assert [r["projection"] for r in c["launches"]] == ["gate_up_proj", "down_proj"]
    for r in c["launches"]:
        assert all("moe_gemv" in k for k in r["kernels"])
        assert r["weight_bytes_read"] == r["selected_expert_bytes"]
        assert r["rel_err_vs_torch"] < 1e-2
    assert c["weight_bytes_per_token"] == c["min_weight_bytes_per_token"]


def test_bench_moe_generate_section(tmp_path):
    # the generate() rows on a tiny random MoE: every model generates the requested tokens, the
    # dense rows agree with themselves, the quantized experts are smaller than the dense ones
    from benchmarks import bench_moe

    out = tmp_path / "gen.json"
    result = bench_moe.main(["--skip-block", "--gen-layers", "1", "--gen-hidden", "128", "--gen-experts", "4",
                             "--gen-inter", "64", "--gen-vocab", "128", "--gen-prompt", "4", "--gen-new", "3",
                             "--gen-rounds", "1", "--json", str(out)])
    gen = json.loads(out.read_text())["generate"]
    assert gen["rows"] == json.loads(json.dumps(result["generate"]["rows"]))
    rows = {r["method"]: r for r in gen["rows"]}
    assert list(rows) == ["dense bf16", "dense fp32", "marlin experts int8/g64", "marlin experts int4/g64"]
    assert all(r["tok_s"] > 0 and len(r["tokens"]) == 3 for r in rows.values())
    assert rows["dense bf16"]["agree"] == 1.0 and rows["dense fp32"]["agree_fp32"] == 1.0
    mib = gen["experts_MiB"]
    assert mib["marlin experts int4/g64"] < mib["marlin experts int8/g64"] < mib["dense bf16"] < mib["dense fp32"]
    assert result["machine"]["device"] == "cpu"


def test_upcycled_mixtral_computes_the_llama_without_noise(pylm_s_path):
    # every expert a copy of the MLP and top-k weights summing to 1: the MoE block is the MLP,
    # so the upcycled Mixtral's logits are the Llama's (up to summation order)
    from benchmarks import bench_moe
    from metal_marlin_torch.io.hf import load_pretrained

    moe = bench_moe.upcycle_llama(str(pylm_s_path), 4, 2, 0.0, "cpu").float()
    llama = load_pretrained(pylm_s_path, dtype=torch.float32)
    ids = torch.tensor([[1, 50, 300, 7, 2000, 12]])
    with torch.no_grad():
        want = llama(ids).logits
        got = moe(ids).logits
    # bf16 rounding of the upcycled weights is the only difference
    assert float((got - want).norm() / want.norm()) < 0.02
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_attention_traffic_counts_the_gqa_rereads(tmp_path):
    """The decode traffic script on a tiny cache: a row threadgroup serves up to 4 query heads of
    a GQA group, reading each K/V element once for them, so with 8 query heads per K/V head the
    K/V bytes read are exactly 2x the cache's bytes (1x would be one threadgroup per group)."""
    from metal_marlin_torch import emulator  # noqa: PLC0415

    if not emulator.available():
        pytest.skip("needs clang-19 for the MSL emulator")
    from benchmarks import attention_traffic  # noqa: PLC0415

    out = tmp_path / "traffic.json"
    result = attention_traffic.main(["--lengths", "40", "--heads", "8,1", "--head-dim", "16", "--json", str(out)])
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    rows = {r["cache"]: r for r in result["rows"]}
    assert set(rows) == {"fp16", "fp8"}
    for r in rows.values():
        assert r["read_per_cache_byte"] == 2.0 and r["cache_bytes_touched"] == r["cache_bytes"]
    assert rows["fp8"]["cache_bytes"] == 2 * 40 * (16 + 4)  # K and V: codes + one fp32 scale per token
