"""``marlin generate`` (metal_marlin_torch.cli.generate) on the tiny real Llama pylm-s.

The reference is transformers' own greedy ``generate`` on the same quantized model, decoded with
the same tokenizer: the streamed text must be exactly that continuation.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from metal_marlin_torch.cli import generate as G
from metal_marlin_torch.cli import main

PROMPT = "Once upon a time"
NEW = 3

def greedy_text(model, tokenizer) -> str:
    ids = tokenizer(PROMPT, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=NEW, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return PROMPT + tokenizer.decode(out[0, ids["input_ids"].shape[-1]:])


@pytest.fixture(scope="module")
def tokenizer(pylm_s_path):
    from transformers import AutoTokenizer  # noqa: PLC0415

    return AutoTokenizer.from_pretrained(str(pylm_s_path))


@pytest.fixture(scope="module")
def int8_checkpoint(tmp_path_factory, pylm_s_path) -> tuple[Path, torch.nn.Module]:
    from metal_marlin_torch.io import save_quantized  # noqa: PLC0415
    from metal_marlin_torch.io.hf import copy_tokenizer, load_pretrained  # noqa: PLC0415
    from metal_marlin_torch.nn import QuantConfig, quantize_model  # noqa: PLC0415

    model = load_pretrained(pylm_s_path, dtype=torch.float32)
    quantize_model(model, QuantConfig(format="int8", group_size=64))
    out = tmp_path_factory.mktemp("ckpt")
    save_quantized(model, out)
    copy_tokenizer(pylm_s_path, out)
    return out, model


@pytest.fixture(scope="module")
def expected_text(int8_checkpoint, tokenizer) -> str:
    return greedy_text(int8_checkpoint[1], tokenizer)


def test_generate_prequantized(int8_checkpoint, expected_text, capsys) -> None:
    path, _ = int8_checkpoint
    assert main(["generate", str(path), PROMPT, "--max-new-tokens", str(NEW), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert captured.out.rstrip("\n") == expected_text
    assert "pre-quantized checkpoint" in captured.err
    assert f"[{NEW} tokens;" in captured.err and "tokens/s" in captured.err
    assert "peak RSS" in captured.err
    # the model bytes printed are those of the checkpoint (plus a few KiB of rotary buffers)
    mib = float(captured.err.split("model ")[1].split(" MiB")[0])
    on_disk = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20
    assert abs(mib - on_disk) < 0.02 * on_disk


def test_generate_quantize_on_the_fly(expected_text, pylm_s_path, capsys) -> None:
    # the same quantization as the checkpoint fixture, done by the command itself
    assert main(["generate", str(pylm_s_path), PROMPT, "--max-new-tokens", str(NEW), "--format", "int8",
                 "--group-size", "64", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert captured.out.rstrip("\n") == expected_text
    assert "quantized on the fly: quantized 42 layers" in captured.err


def test_pick_device(monkeypatch) -> None:
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert G.pick_device("auto").type == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert G.pick_device("auto").type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert G.pick_device("auto").type == "cpu"
    assert G.pick_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="MPS is not available"):
        G.pick_device("mps")
    with pytest.raises(ValueError, match="--device"):
        G.pick_device("tpu")
    assert G.pick_dtype("auto", torch.device("mps")) == torch.float16
    assert G.pick_dtype("auto", torch.device("cpu")) == torch.float32


def test_cast_dense_keeps_quantized_tensors() -> None:
    from metal_marlin_torch.nn import MarlinLinear  # noqa: PLC0415

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64))
    model[0] = MarlinLinear.from_linear(model[0], "int4", 32)
    bias_dtype = model[0].bias.dtype
    assert bias_dtype != torch.bfloat16  # else the cast below could not show the layer was skipped
    G.cast_dense(model, torch.bfloat16)
    assert model[1].weight.dtype == torch.bfloat16  # dense parameters are cast
    assert model[0].bias.dtype == bias_dtype  # the quantized layer's parameters are not
    assert model[0].scales.dtype == torch.float16 and model[0].weight.dtype == torch.uint32
    assert model[0].biases.dtype == model[0].dtype_config.torch_scales


def test_errors(tmp_path: Path, int8_checkpoint, pylm_s_path, capsys) -> None:
    assert main(["generate", str(tmp_path), PROMPT]) == 2
    assert "error" in capsys.readouterr().err
    assert main(["generate", str(pylm_s_path), PROMPT, "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens" in capsys.readouterr().err
    path, _ = int8_checkpoint
    assert main(["generate", str(path), PROMPT, "--format", "fp4", "--device", "cpu"]) == 2
    assert "already quantized" in capsys.readouterr().err
    no_tok = tmp_path / "no_tokenizer"
    shutil.copytree(path, no_tok, ignore=shutil.ignore_patterns("tokenizer*"))
    assert main(["generate", str(no_tok), PROMPT, "--device", "cpu"]) == 2
    assert "tokenizer" in capsys.readouterr().err


# ---- sampling filters, chat template, KV cache --------------------------------------------------

def test_top_k_one_and_min_p_one_are_greedy(int8_checkpoint, expected_text, capsys) -> None:
    # top-k 1 (and min-p 1: only tokens as likely as the best) leave the argmax alone: sampling
    # at any temperature must give the greedy text, so the options reach generate()
    path, _ = int8_checkpoint
    for extra in (["--top-k", "1"], ["--min-p", "1.0"]):
        assert main(["generate", str(path), PROMPT, "--max-new-tokens", str(NEW), "--device", "cpu",
                     "--temperature", "5.0", "--seed", "3", *extra]) == 0
        assert capsys.readouterr().out.rstrip("\n") == expected_text, extra


def test_kv_cache_option(int8_checkpoint, tokenizer, capsys, monkeypatch) -> None:
    from metal_marlin_torch.kv.cache import make_cache  # noqa: PLC0415
    from metal_marlin_torch.kv.layers import QuantizedKVCache  # noqa: PLC0415

    made = []
    real = G.kv_cache
    monkeypatch.setattr(G, "kv_cache", lambda m, name: made.append(real(m, name)) or made[-1])
    path, model = int8_checkpoint
    ids = tokenizer(PROMPT, return_tensors="pt")
    for name, method, bits in (("fp8", "fp8", 4), ("turboquant4", "turboquant", 4)):
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=NEW, do_sample=False, pad_token_id=tokenizer.eos_token_id,
                                 cache=make_cache(model.config, method=method, bits=bits))
        expected = PROMPT + tokenizer.decode(out[0, ids["input_ids"].shape[-1]:])
        assert main(["generate", str(path), PROMPT, "--max-new-tokens", str(NEW), "--device", "cpu",
                     "--kv-cache", name]) == 0
        assert capsys.readouterr().out.rstrip("\n") == expected, name
        # the command's cache is the one generate() filled
        assert isinstance(made[-1], QuantizedKVCache) and made[-1].get_seq_length() > 0


def test_chat_template(int8_checkpoint, tokenizer, tmp_path: Path, capsys) -> None:
    import json  # noqa: PLC0415

    path, model = int8_checkpoint
    assert main(["generate", str(path), "hi", "--chat", "--device", "cpu"]) == 2
    assert "no chat template" in capsys.readouterr().err
    chat = tmp_path / "chat"
    shutil.copytree(path, chat)
    template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    cfg = json.loads((chat / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (chat / "tokenizer_config.json").write_text(json.dumps(cfg))
    text = "<system>be brief\n<user>Once upon a time\n<assistant>"
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=NEW, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    reply = tokenizer.decode(out[0, ids["input_ids"].shape[-1]:])
    assert main(["generate", str(chat), PROMPT, "--chat", "--system", "be brief", "--max-new-tokens", str(NEW),
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == reply


def test_sampling_option_errors(int8_checkpoint, capsys) -> None:
    path, _ = int8_checkpoint
    for bad, flag in ((["--top-k", "0", "--temperature", "1"], "--top-k"), (["--min-p", "2", "--temperature", "1"],
                      "--min-p"), (["--top-k", "5"], "--temperature")):
        assert main(["generate", str(path), PROMPT, "--device", "cpu", *bad]) == 2
        assert flag in capsys.readouterr().err



def test_draft_model_speculative_decoding(int8_checkpoint, pylm_s_path, tokenizer, capsys, monkeypatch) -> None:
    # greedy assisted decoding returns exactly the greedy text of MODEL alone; the draft (pylm-s,
    # quantized on the fly to the default fp4, so it disagrees with the int8 model now and then)
    # must have run forward passes
    forwards = []
    real = G.load_draft

    def load_draft(*args):
        draft = real(*args)
        draft.register_forward_hook(lambda *_: forwards.append(1))
        return draft

    monkeypatch.setattr(G, "load_draft", load_draft)
    path, model = int8_checkpoint
    new = 6
    assert main(["generate", str(path), PROMPT, "--max-new-tokens", str(new), "--device", "cpu",
                 "--draft", str(pylm_s_path)]) == 0
    out = capsys.readouterr()
    assert "[draft " in out.err and "quantized on the fly" in out.err and forwards
    ids = tokenizer(PROMPT, return_tensors="pt")
    with torch.inference_mode():
        ref = model.generate(**ids, max_new_tokens=new, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert out.out.rstrip("\n") == PROMPT + tokenizer.decode(ref[0, ids["input_ids"].shape[-1]:])
    assert main(["generate", str(path), PROMPT, "--device", "cpu", "--draft", str(path), "--kv-cache", "fp8"]) == 2
    assert "--draft runs with transformers' own KV cache" in capsys.readouterr().err
