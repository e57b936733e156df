"""``marlin quantize --method gptq`` and ``marlin eval`` end to end on pylm-s (small budgets)."""

from __future__ import annotations

import json

from metal_marlin_torch.cli import main


def test_gptq_quantize_then_eval(tmp_path, pylm_s_path, capsys):
    text = tmp_path / "calib.py"
    text.write_text("def add(a, b):\n    return a + b\n\n" * 60 + "class Point:\n    x: int = 0\n" * 40)
    evaluation = tmp_path / "eval.py"
    evaluation.write_text("import os\n\nfor name in os.listdir('.'):\n    print(name.upper())\n" * 40)
    out = tmp_path / "q"
    assert main(["quantize", str(pylm_s_path), str(out), "--format", "int4", "--method", "gptq",
                 "--calibration", str(text), "--calib-samples", "2", "--calib-seq-len", "64",
                 "--device", "cpu", "--no-scale-search"]) == 0
    assert "quantized 42 layers" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["quantization_config"]["method"] == "gptq"
    assert not (tmp_path / "q.work").exists()  # resume data removed after a successful save

    report = tmp_path / "r.json"
    assert main(["eval", str(out), "--reference", str(pylm_s_path), "--text", str(evaluation),
                 "--tokens", "256", "--seq-len", "64", "--json", str(report)]) == 0
    r = json.loads(report.read_text())
    assert r["tokens"] == 4 * 63 and 1.0 < r["perplexity"] < 100.0
    assert r["kl_mean"] > 0 and 0.0 < r["top1_agreement"] <= 1.0

    # the unquantized model against itself: no divergence, full agreement
    assert main(["eval", str(pylm_s_path), "--reference", str(pylm_s_path), "--text", str(evaluation),
                 "--tokens", "128", "--seq-len", "64", "--json", str(report)]) == 0
    same = json.loads(report.read_text())
    assert same["kl_mean"] < 1e-9 and same["top1_agreement"] == 1.0


def test_eval_argument_errors(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert "exactly one" in capsys.readouterr().err
