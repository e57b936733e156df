"""The marlin command end to end on the real pylm-s model."""

import json

import pytest
import torch

from metal_marlin_torch import load_quantized
from metal_marlin_torch.cli import main


def test_quantize_then_info_then_load(tmp_path, pylm_s_path, capsys):
    out = tmp_path / "pylm-s-int4"
    assert main(["quantize", str(pylm_s_path), str(out), "--format", "int4", "--group-size", "64", "--mixed"]) == 0
    assert "quantized 42 layers" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["layers"]["model.layers.0.mlp.up_proj"]["format"] == "nf3"
    assert cfg["layers"]["model.layers.0.self_attn.q_proj"]["format"] == "fp4"
    assert (out / "tokenizer.json").is_file()
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "quantized layers: 42" in info and "nf3 group   64: 12 layers" in info
    model = load_quantized(out)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 4096, (1, 8))).logits).all()


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["info", str(tmp_path)]) == 2
    assert "config.json not found" in capsys.readouterr().err
    assert main(["info"]) == 0
    assert "kernels" in capsys.readouterr().out


def test_demo_runs(capsys):
    assert main(["demo", "--formats", "int8", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.strip().startswith("int8"))
    cos_mean = float(row.split("|")[4])
    assert cos_mean > 0.999  # int8 keeps sentence embeddings nearly identical
    assert "identical embeddings" in out


def test_quantize_at_a_bit_budget(tmp_path, pylm_s_path, capsys):
    import shutil

    from tests.conftest import tiny_llama

    src = tmp_path / "tiny"  # a tiny Llama with pylm-s's tokenizer: the budget path end to end, fast
    torch.manual_seed(0)
    tiny_llama(vocab=4096).save_pretrained(src)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(pylm_s_path / name, src / name)
    text = tmp_path / "calib.txt"
    text.write_text("def f(x):\n    return [x + i for i in range(10)]\n" * 200)
    out = tmp_path / "tiny-3.5"
    assert main(["quantize", str(src), str(out), "--bits", "3.5", "--calibration", str(text),
                 "--calib-samples", "2", "--calib-seq-len", "64"]) == 0
    printed = capsys.readouterr().out
    assert "bit budget 3.5 bits/weight" in printed
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert 3.3 < cfg["budget"]["achieved_bits_per_weight"] <= 3.5
    assert cfg["config"]["bits_per_weight"] == 3.5
    plan = cfg["budget"]["plan"]
    assert {n: [s["format"], s["group_size"]] for n, s in cfg["layers"].items()} == plan
    assert len({tuple(v) for v in plan.values()}) > 1  # mixed: the budget is spent unevenly
    model = load_quantized(out)  # each layer loads with its own format and group
    layers = {n: [m.format, m.group_size] for n, m in model.named_modules() if hasattr(m, "group_size")}
    assert layers == plan


def test_gptq_cpu_threads_follow_the_free_cores(monkeypatch):
    # --threads N wins; without it, OMP_NUM_THREADS is respected, else torch's threads are cut
    # to the cores the load average leaves free (at least 1)
    import torch

    from metal_marlin_torch.cli import quantize as Q

    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(Q.os, "cpu_count", lambda: 4)
        monkeypatch.setattr(Q.os, "getloadavg", lambda: (3.4, 0.0, 0.0))
        assert Q.free_cores() == 1
        monkeypatch.setattr(Q.os, "getloadavg", lambda: (9.0, 0.0, 0.0))
        assert Q.free_cores() == 1
        monkeypatch.setattr(Q.os, "getloadavg", lambda: (0.6, 0.0, 0.0))
        assert Q.free_cores() == 3
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        monkeypatch.setattr(Q.os, "getloadavg", lambda: (3.9, 0.0, 0.0))
        Q.set_cpu_threads(None)
        assert torch.get_num_threads() == 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        Q.set_cpu_threads(None)
        assert torch.get_num_threads() == 1
        Q.set_cpu_threads(2)
        assert torch.get_num_threads() == 2
        with pytest.raises(ValueError, match="--threads must be >= 1, got 0"):
            Q.set_cpu_threads(0)
    finally:
        torch.set_num_threads(before)


def test_quantize_int5_and_gptq_int6(tmp_path, pylm_s_path, capsys):
    # the 5- and 6-bit formats through the command line: RTN int5 and GPTQ int6, saved and
    # reloaded with their own format, group and packed width (5 or 6 words per 32 inputs)
    import shutil

    from tests.conftest import tiny_llama

    src = tmp_path / "tiny"
    torch.manual_seed(0)
    dense = tiny_llama(vocab=4096)
    dense.save_pretrained(src)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(pylm_s_path / name, src / name)
    text = tmp_path / "calib.txt"
    text.write_text("def f(x):\n    return [x + i for i in range(10)]\n" * 200)
    ids = torch.randint(0, 4096, (1, 8))
    with torch.no_grad():
        ref = dense(ids).logits
    for fmt, group, extra in (("int5", "32", []), ("int6", "64", ["--method", "gptq", "--calibration", str(text),
                                                                  "--calib-samples", "2", "--calib-seq-len", "64"])):
        out = tmp_path / fmt
        assert main(["quantize", str(src), str(out), "--format", fmt, "--group-size", group, *extra]) == 0
        capsys.readouterr()
        cfg = json.loads((out / "config.json").read_text())["quantization_config"]
        assert {(s["format"], s["group_size"]) for s in cfg["layers"].values()} == {(fmt, int(group))}
        model = load_quantized(out)
        up = model.model.layers[0].mlp.up_proj
        assert up.format == fmt and up.weight.shape == (128, 64 * int(fmt[3:]) // 32)
        with torch.no_grad():
            got = model(ids).logits
        # 5/6 bits keep the tiny model's logits close to the dense ones
        assert float((got - ref).norm() / ref.norm()) < 0.05


def test_quantize_rtn_with_imatrix_and_refine(tmp_path, pylm_s_path, capsys):
    import shutil

    from tests.conftest import tiny_llama

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: the intra-op pool's fork/join costs more than the ops
    src = tmp_path / "tiny"
    torch.manual_seed(0)
    tiny_llama(vocab=4096).save_pretrained(src)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(pylm_s_path / name, src / name)
    text = tmp_path / "calib.txt"
    text.write_text("def f(x):\n    return [x + i for i in range(10)]\n" * 200)
    try:
        _imatrix_and_refine(src, text, tmp_path, capsys)
    finally:
        torch.set_num_threads(threads)


def _imatrix_and_refine(src, text, tmp_path, capsys) -> None:
    from metal_marlin_torch import QuantConfig, quantize_model
    from tests.conftest import tiny_llama

    common = ["--format", "int4", "--group-size", "32", "--calibration", str(text), "--calib-samples", "4",
              "--calib-seq-len", "64"]
    out = tmp_path / "imatrix"
    assert main(["quantize", str(src), str(out), "--imatrix", *common]) == 0
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["config"]["method_options"]["imatrix"] is True and not (tmp_path / "imatrix.work").exists()
    refined = tmp_path / "refined"
    assert main(["quantize", str(src), str(refined), "--refine", "--refine-steps", "4", *common]) == 0
    cfg = json.loads((refined / "config.json").read_text())["quantization_config"]
    assert cfg["config"]["refine"] is True and cfg["config"]["method_options"]["refine_steps"] == 4
    a, b = load_quantized(out), load_quantized(refined)
    torch.manual_seed(0)
    plain = tiny_llama(vocab=4096)
    quantize_model(plain, QuantConfig(format="int4", group_size=32, method_options={"scale_search": True}))
    up = "model.layers.0.mlp.up_proj"
    # refined RTN keeps the searched RTN codes; the importance matrix moves some groups' scales
    assert torch.equal(b.get_submodule(up).weight, plain.get_submodule(up).weight)
    assert not torch.equal(b.get_submodule(up).scales, plain.get_submodule(up).scales)
    assert not torch.equal(a.get_submodule(up).scales, plain.get_submodule(up).scales)
    whole = tmp_path / "whole"  # the whole-model stage: recorded in the checkpoint, RTN codes kept
    assert main(["quantize", str(src), str(whole), "--refine", "model", "--refine-steps", "4", *common]) == 0
    cfg = json.loads((whole / "config.json").read_text())["quantization_config"]
    assert cfg["config"]["refine"] == "model" and cfg["config"]["method_options"]["refine_steps"] == 4
    c = load_quantized(whole)
    assert torch.equal(c.get_submodule(up).weight, plain.get_submodule(up).weight)
    assert not torch.equal(c.get_submodule(up).scales, plain.get_submodule(up).scales)
    assert main(["quantize", str(src), str(tmp_path / "x"), "--method", "gptq", "--imatrix"]) == 2
    assert "--imatrix and --rtn-search apply to --method rtn" in capsys.readouterr().err


def test_quantize_autoround(tmp_path, pylm_s_path, capsys):
    """``--method autoround`` (quant/autoround.py; its effect is tested in
    tests/quant/test_autoround.py): the options reach the checkpoint's config, the layers load in
    the format asked for, and the options are refused with another method."""
    import shutil

    from tests.conftest import tiny_llama

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: the intra-op pool's fork/join costs more than the ops
    try:
        src = tmp_path / "tiny"
        torch.manual_seed(0)
        tiny_llama(vocab=4096).save_pretrained(src)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(pylm_s_path / name, src / name)
        text = tmp_path / "calib.txt"
        text.write_text("def f(x):\n    return [x + i for i in range(10)]\n" * 200)
        common = ["--format", "int3", "--group-size", "32", "--calibration", str(text), "--calib-samples", "4",
                  "--calib-seq-len", "64"]
        learned = tmp_path / "autoround"
        assert main(["quantize", str(src), str(learned), "--method", "autoround", "--autoround-steps", "8",
                     *common]) == 0
        cfg = json.loads((learned / "config.json").read_text())["quantization_config"]
        assert cfg["config"]["method"] == "autoround" and cfg["config"]["method_options"]["autoround_steps"] == 8
        formats = {m.format for m in load_quantized(learned).modules() if hasattr(m, "format")}
        assert formats == {"int3"}
        capsys.readouterr()
        assert main(["quantize", str(src), str(tmp_path / "x"), "--autoround-steps", "4", *common]) == 2
        assert "--autoround-steps needs --method autoround, got --method rtn" in capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)
