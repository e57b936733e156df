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
                                "--prompt", "4", "--new", "3", "--prefill", "8", "--repeats", "1",
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
