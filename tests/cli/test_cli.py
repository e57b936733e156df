"""The marlin command end to end on the real pylm-s model."""

import json

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
    assert main(["quantize", str(src), str(tmp_path / "x"), "--method", "gptq", "--imatrix"]) == 2
    assert "--imatrix and --rtn-search apply to --method rtn" in capsys.readouterr().err
