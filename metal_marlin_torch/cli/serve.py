"""``marlin serve MODEL``: a minimal OpenAI-compatible HTTP server (stdlib ``http.server``).

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` (messages under the tokenizer's chat
template; ``"stream": true`` sends server-sent events as OpenAI does, ending with ``data:
[DONE]``) and ``POST /v1/completions`` (plain prompt). Request fields used: ``max_tokens``,
``temperature`` (0 or absent: greedy), ``top_p``, ``top_k``, ``min_p``, ``seed``. One request
is served at a time (one model, one generate at once); it listens on 127.0.0.1 by default and
has no authentication: not for exposure beyond the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from .. import formats as F


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat completions, streaming) for a model")
    p.add_argument("model", help="metal_marlin checkpoint or Hugging Face model directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--format", default=None, choices=sorted(F.FORMATS),
                   help="quantize a Hugging Face model on the fly to this format (default fp4)")
    p.add_argument("--group-size", type=int, default=None)
    p.add_argument("--no-quantize", action="store_true", help="serve a Hugging Face model unquantized")
    p.add_argument("--device", default="auto", help="auto (mps > cuda > cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    p.add_argument("--max-tokens", type=int, default=256, help="default and upper bound of max_tokens (256)")
    p.set_defaults(func=run)


class RequestError(ValueError):
    """A bad request: answered with HTTP 400 and OpenAI's error body."""


def _generate_kwargs(body: dict[str, Any], limit: int) -> dict[str, Any]:
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens", limit))
    if not isinstance(max_tokens, int) or not 0 < max_tokens <= limit:
        raise RequestError(f"max_tokens must be an integer in [1, {limit}], got {max_tokens!r}")
    kwargs: dict[str, Any] = {"max_new_tokens": max_tokens, "do_sample": False}
    temperature = body.get("temperature") or 0
    if not isinstance(temperature, int | float) or temperature < 0:
        raise RequestError(f"temperature must be a number >= 0, got {temperature!r}")
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=float(temperature))
        for key in ("top_p", "top_k", "min_p"):
            if body.get(key) is not None:
                kwargs[key] = body[key]
    return kwargs


class Engine:
    """The model, its tokenizer and a lock: what every request handler shares."""

    def __init__(self, model: Any, tokenizer: Any, name: str, max_tokens: int = 256) -> None:
        self.model, self.tokenizer, self.name, self.max_tokens = model, tokenizer, name, max_tokens
        self.lock = threading.Lock()
        self.device = next(model.parameters()).device

    def inputs(self, body: dict[str, Any], chat: bool) -> Any:
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise RequestError("messages must be a non-empty list of {role, content}")
            if not getattr(self.tokenizer, "chat_template", None):
                raise RequestError("this model's tokenizer has no chat template; use /v1/completions")
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                      return_dict=True).to(self.device)
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise RequestError("prompt must be a non-empty string")
        return self.tokenizer(prompt, return_tensors="pt").to(self.device)

    def generate(self, body: dict[str, Any], chat: bool, streamer: Any = None) -> tuple[str, int, int, str]:
        """(text, prompt tokens, completion tokens, finish reason)."""
        import torch  # noqa: PLC0415

        inputs = self.inputs(body, chat)
        kwargs = _generate_kwargs(body, self.max_tokens)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with self.lock, torch.inference_mode():
            if body.get("seed") is not None:
                torch.manual_seed(int(body["seed"]))
            out = self.model.generate(**inputs, pad_token_id=pad, streamer=streamer, **kwargs)
        n_prompt = inputs["input_ids"].shape[-1]
        new = out[0, n_prompt:]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        finish = "length" if new.numel() >= kwargs["max_new_tokens"] else "stop"
        return text, n_prompt, int(new.numel()), finish


def make_server(engine: Engine, host: str = "127.0.0.1", port: int = 0) -> HTTPServer:
    """An ``HTTPServer`` answering the OpenAI endpoints with ``engine`` (``serve_forever`` it)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *args: Any) -> None:  # one line per request on stderr
            print(f"[serve] {self.address_string()} {fmt % args}", file=sys.stderr)

        def _json(self, code: int, data: dict[str, Any]) -> None:
            raw = json.dumps(data).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def _error(self, code: int, message: str) -> None:
            self._json(code, {"error": {"message": message, "type": "invalid_request_error", "code": code}})

        def do_GET(self) -> None:  # noqa: N802  (http.server's name)
            if self.path.rstrip("/") == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": engine.name, "object": "model",
                                                             "owned_by": "metal_marlin"}]})
            else:
                self._error(404, f"no route GET {self.path}")

        def do_POST(self) -> None:  # noqa: N802
            route = self.path.rstrip("/")
            if route not in ("/v1/chat/completions", "/v1/completions"):
                self._error(404, f"no route POST {self.path}")
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(body, dict):
                    raise RequestError("the request body must be a JSON object")
            except (ValueError, json.JSONDecodeError) as err:
                self._error(400, f"bad request body: {err}")
                return
            chat = route == "/v1/chat/completions"
            try:
                if body.get("stream"):
                    self._stream(body, chat)
                else:
                    self._complete(body, chat)
            except RequestError as err:
                self._error(400, str(err))

        def _complete(self, body: dict[str, Any], chat: bool) -> None:
            text, n_prompt, n_new, finish = engine.generate(body, chat)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                      if chat else {"index": 0, "text": text, "finish_reason": finish})
            self._json(200, {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                             "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": engine.name, "choices": [choice],
                             "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_new,
                                       "total_tokens": n_prompt + n_new}})

        def _stream(self, body: dict[str, Any], chat: bool) -> None:
            from transformers import TextIteratorStreamer  # noqa: PLC0415

            engine.inputs(body, chat)  # bad requests fail here, before the event stream starts
            _generate_kwargs(body, engine.max_tokens)
            streamer = TextIteratorStreamer(engine.tokenizer, skip_prompt=True, skip_special_tokens=True)
            result: dict[str, Any] = {}

            def work() -> None:
                try:
                    result["out"] = engine.generate(body, chat, streamer)
                except Exception as err:  # noqa: BLE001  (reported in the stream)
                    result["error"] = err
                    streamer.end()

            thread = threading.Thread(target=work, daemon=True)
            thread.start()
            cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
            obj = "chat.completion.chunk" if chat else "text_completion"
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()

            def event(choice: dict[str, Any]) -> None:
                data = {"id": cid, "object": obj, "created": int(time.time()), "model": engine.name,
                        "choices": [choice]}
                self.wfile.write(f"data: {json.dumps(data)}\n\n".encode())
                self.wfile.flush()

            if chat:
                event({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
            for piece in streamer:
                if piece:
                    event({"index": 0, "delta": {"content": piece}, "finish_reason": None} if chat
                          else {"index": 0, "text": piece, "finish_reason": None})
            thread.join()
            if "error" in result:
                event({"index": 0, "delta": {}, "finish_reason": "error", "error": str(result["error"])})
            else:
                finish = result["out"][3]
                event({"index": 0, "delta": {}, "finish_reason": finish} if chat
                      else {"index": 0, "text": "", "finish_reason": finish})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
            self.close_connection = True

    return HTTPServer((host, port), Handler)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path  # noqa: PLC0415

    from transformers import AutoTokenizer  # noqa: PLC0415

    from .generate import cast_dense, load_model, pick_device, pick_dtype, require_causal_lm  # noqa: PLC0415

    if args.max_tokens <= 0:
        raise ValueError(f"--max-tokens must be positive, got {args.max_tokens}")
    device = pick_device(args.device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError) as err:
        raise ValueError(f"no tokenizer in {args.model}: {err}") from None
    model, how = load_model(args)
    require_causal_lm(model, args.model, "serve")
    cast_dense(model, pick_dtype(args.dtype, device))
    model = model.to(device).eval()
    server = make_server(Engine(model, tokenizer, Path(args.model).name, args.max_tokens), args.host, args.port)
    host, port = server.server_address[:2]
    print(f"[{how}; {device}] serving on http://{host}:{port}/v1 (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
