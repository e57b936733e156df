"""``marlin chat`` (metal_marlin_torch.cli.chat): a two-turn conversation fed through stdin.

The reference is transformers' greedy ``generate`` on the same quantized model, each turn's
prompt built by ``apply_chat_template`` from the whole conversation so far (the first reply
included): the printed replies must be exactly those.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import torch

from metal_marlin_torch.cli import main

NEW = 4
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def test_chat_two_turns_and_reset(pylm_s_path, tmp_path: Path, capsys, monkeypatch) -> None:
    from transformers import AutoTokenizer  # noqa: PLC0415

    from metal_marlin_torch.io.hf import load_pretrained  # noqa: PLC0415
    from metal_marlin_torch.nn import QuantConfig, quantize_model  # noqa: PLC0415

    src = tmp_path / "chat"
    shutil.copytree(pylm_s_path, src)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["chat_template"] = TEMPLATE
    (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = AutoTokenizer.from_pretrained(str(src))
    model = load_pretrained(src, dtype=torch.float32)
    quantize_model(model, QuantConfig(format="int8", group_size=64))

    def turn(messages):
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=NEW, do_sample=False, pad_token_id=tok.eos_token_id)
        new = out[0, ids["input_ids"].shape[-1]:]
        return tok.decode(new), tok.decode(new, skip_special_tokens=True)

    system = [{"role": "system", "content": "be brief"}]
    shown1, kept1 = turn(system + [{"role": "user", "content": "Once upon a time"}])
    shown2, _ = turn(system + [{"role": "user", "content": "Once upon a time"},
                               {"role": "assistant", "content": kept1}, {"role": "user", "content": "and then"}])
    shown3, _ = turn(system + [{"role": "user", "content": "and then"}])  # after /reset: a fresh conversation

    monkeypatch.setattr("sys.stdin", io.StringIO("Once upon a time\nand then\n/reset\nand then\n/exit\nignored\n"))
    assert main(["chat", str(src), "--system", "be brief", "--max-new-tokens", str(NEW), "--format", "int8",
                 "--group-size", "64", "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert out.out == f"{shown1}\n{shown2}\n{shown3}\n"
    assert "[conversation reset]" in out.err


def test_chat_needs_a_template(pylm_s_path, capsys) -> None:
    assert main(["chat", str(pylm_s_path), "--device", "cpu"]) == 2
    assert "no chat template" in capsys.readouterr().err
