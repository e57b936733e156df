"""``marlin serve`` (metal_marlin_torch.cli.serve): OpenAI-style HTTP round trips on localhost.

The server runs in a thread on a free port; requests go through urllib, a real HTTP client. The
reference is transformers' greedy ``generate`` on the same quantized pylm-s and rendered prompt.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest
import torch

from metal_marlin_torch.cli import serve as S

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
NEW = 4


@pytest.fixture(scope="module")
def served(pylm_s_path):
    from transformers import AutoTokenizer  # noqa: PLC0415

    from metal_marlin_torch.io.hf import load_pretrained  # noqa: PLC0415
    from metal_marlin_torch.nn import QuantConfig, quantize_model  # noqa: PLC0415

    model = load_pretrained(pylm_s_path, dtype=torch.float32)
    quantize_model(model, QuantConfig(format="int8", group_size=64))
    tok = AutoTokenizer.from_pretrained(str(pylm_s_path))
    tok.chat_template = TEMPLATE
    server = S.make_server(S.Engine(model, tok, "pylm-s", max_tokens=16))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", model, tok
    server.shutdown()
    server.server_close()


def post(url: str, body: dict) -> urllib.request.Request:
    return urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})


def greedy(model, tok, text: str) -> str:
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=NEW, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[-1]:], skip_special_tokens=True)


MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Once upon a time"}]
RENDERED = "<system>be brief\n<user>Once upon a time\n<assistant>"


def test_chat_completion(served) -> None:
    url, model, tok = served
    with urllib.request.urlopen(post(f"{url}/v1/chat/completions",
                                     {"model": "pylm-s", "messages": MESSAGES, "max_tokens": NEW})) as r:
        data = json.load(r)
    assert data["object"] == "chat.completion"
    msg = data["choices"][0]["message"]
    assert msg["role"] == "assistant" and msg["content"] == greedy(model, tok, RENDERED)
    assert data["usage"]["completion_tokens"] == NEW and data["choices"][0]["finish_reason"] == "length"


def test_chat_completion_streaming(served) -> None:
    url, model, tok = served
    with urllib.request.urlopen(post(f"{url}/v1/chat/completions",
                                     {"messages": MESSAGES, "max_tokens": NEW, "stream": True})) as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        lines = [ln.decode().strip() for ln in r if ln.strip()]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[len("data: "):]) for ln in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == greedy(model, tok, RENDERED)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_completion_and_models(served) -> None:
    url, model, tok = served
    with urllib.request.urlopen(f"{url}/v1/models") as r:
        assert json.load(r)["data"][0]["id"] == "pylm-s"
    with urllib.request.urlopen(post(f"{url}/v1/completions", {"prompt": "def main():", "max_tokens": NEW})) as r:
        data = json.load(r)
    ids = tok("def main():", return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=NEW, do_sample=False, pad_token_id=tok.eos_token_id)
    assert data["choices"][0]["text"] == tok.decode(out[0, ids["input_ids"].shape[-1]:], skip_special_tokens=True)


@pytest.mark.parametrize(("route", "body", "needle"), [
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 999}, "max_tokens"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/nothing", {}, "no route"),
])
def test_bad_requests(served, route: str, body: dict, needle: str) -> None:
    url, _, _ = served
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(post(f"{url}{route}", body))
    assert err.value.code in (400, 404)
    assert needle in json.load(err.value)["error"]["message"]
