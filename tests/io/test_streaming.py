"""Streaming quantization of sharded checkpoints (metal_marlin_torch.io.streaming).

The reference is the in-memory path: ``from_pretrained`` + ``quantize_model`` + ``save_quantized``
state, which the streamed checkpoint must equal tensor for tensor. Memory is measured in a
child process (``ru_maxrss``) against the size of the checkpoint it quantizes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from metal_marlin_torch.io import load_quantized, read_tensors
from metal_marlin_torch.io import streaming as S
from metal_marlin_torch.io.skeleton import hf_skeleton
from metal_marlin_torch.nn import QuantConfig, quantize_model

ROOT = Path(__file__).resolve().parents[2]


def llama_config(hidden: int, inter: int, layers: int, vocab: int = 256, tied: bool = False,
                 bias: bool = False) -> dict:
    from transformers import LlamaConfig  # noqa: PLC0415

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                      max_position_embeddings=64, tie_word_embeddings=tied,
                      attention_bias=bias).to_dict()
    cfg["architectures"] = ["LlamaForCausalLM"]
    return cfg


def write_checkpoint(path: Path, config: dict, shard_bytes: int, seed: int = 0) -> int:
    """A random float32 checkpoint in the Hugging Face sharded layout, written shard by shard
    (never the whole model in memory). Returns its tensor bytes."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    shapes = {k: tuple(t.shape) for k, t in hf_skeleton(config).state_dict().items()}
    if config.get("tie_word_embeddings"):
        shapes.pop("lm_head.weight")
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 4 * torch.Size(shape).numel()
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    gen = torch.Generator().manual_seed(seed)
    files = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for file, names in zip(files, groups, strict=True):
        tensors = {n: torch.randn(shapes[n], generator=gen) * 0.05 for n in names}
        save_file(tensors, str(path / file), metadata={"format": "pt"})
    weight_map = {n: f for f, names in zip(files, groups, strict=True) for n in names}
    total = sum(4 * torch.Size(s).numel() for s in shapes.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def reference_state(src: Path, config: QuantConfig) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    from transformers import LlamaForCausalLM  # noqa: PLC0415

    model = LlamaForCausalLM.from_pretrained(str(src), dtype=torch.float32, local_files_only=True).eval()
    quantize_model(model, config)
    return model, model.state_dict()


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    write_checkpoint(src, llama_config(64, 128, 3, bias=True), shard_bytes=120_000)  # biases: q/k/v/o
    return src


def _shards(path: Path) -> list[Path]:
    return sorted(path.glob("model-*-of-*.safetensors"))


@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])  # row-chunked; nvfp4 in one piece (tensor scale)
def test_stream_equals_in_memory(small_ckpt: Path, tmp_path: Path, fmt: str) -> None:
    config = QuantConfig(format=fmt, group_size=32 if fmt != "nvfp4" else 16)
    summary = S.quantize_checkpoint(small_ckpt, tmp_path / "out", config, chunk_elements=1000, progress=False)
    n_src = len(_shards(small_ckpt))
    assert n_src > 3 and summary.shards_written == n_src and len(_shards(tmp_path / "out")) == n_src
    model, ref = reference_state(small_ckpt, config)
    got = read_tensors(tmp_path / "out")
    assert set(got) == set(ref)
    for key, t in ref.items():
        assert got[key].dtype == t.dtype, key
        assert torch.equal(got[key], t), key
    loaded = load_quantized(tmp_path / "out")
    ids = torch.tensor([[1, 5, 9, 200, 3]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_tied_embeddings(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_checkpoint(src, llama_config(64, 128, 2, tied=True), shard_bytes=100_000)
    config = QuantConfig(format="int8", group_size=64)
    S.quantize_checkpoint(src, tmp_path / "out", config, progress=False)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    loaded = load_quantized(tmp_path / "out")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    model, _ = reference_state(src, config)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


KILL_SCRIPT = """
import os, sys
from metal_marlin_torch.io.streaming import quantize_checkpoint
from metal_marlin_torch.nn import QuantConfig

def stop(index, name):
    if index == 1:
        os._exit(3)  # a hard kill: no cleanup, no exception handlers

quantize_checkpoint(sys.argv[1], sys.argv[2], QuantConfig(format="int4", group_size=32),
                    progress=False, on_shard_done=stop)
"""


def test_resume_after_kill(small_ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(small_ckpt), str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr
    done = _shards(out)
    assert len(done) == 2 and not (out / "config.json").exists()
    mtimes = {p.name: p.stat().st_mtime_ns for p in done}
    # a half-written shard left by the kill is removed, not mistaken for output
    (out / ".model-00003-of-00009.safetensors.tmp-12345").write_bytes(b"partial")

    quantized: list[str] = []
    real = S._quantize_rows

    def spy(w, fmt, *args):
        quantized.append(tuple(w.shape))
        return real(w, fmt, *args)

    monkeypatch.setattr(S, "_quantize_rows", spy)
    config = QuantConfig(format="int4", group_size=32)
    summary = S.quantize_checkpoint(small_ckpt, out, config, progress=False)
    n = len(_shards(small_ckpt))
    assert (summary.shards_skipped, summary.shards_written) == (2, n - 2)
    assert {p.name: p.stat().st_mtime_ns for p in _shards(out)[:2]} == mtimes
    assert not list(out.glob(".*.tmp-*"))
    # only the linear weights of the unfinished shards were quantized again
    index = json.loads((small_ckpt / "model.safetensors.index.json").read_text())
    first_two = {p.name for p in done}
    redo = [k for k, f in index["weight_map"].items() if f not in first_two and k.endswith("proj.weight")]
    assert len(quantized) == len(redo) > 0
    _, ref = reference_state(small_ckpt, config)
    got = read_tensors(out)
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)


def test_settings_mismatch_refused(small_ckpt: Path, tmp_path: Path) -> None:
    S.quantize_checkpoint(small_ckpt, tmp_path, QuantConfig(format="int4", group_size=32), progress=False)
    with pytest.raises(ValueError, match="other settings"):
        S.quantize_checkpoint(small_ckpt, tmp_path, QuantConfig(format="int8", group_size=32), progress=False)


def test_bad_inputs(small_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rtn"):
        S.quantize_checkpoint(small_ckpt, tmp_path / "a", QuantConfig(method="gptq"))
    with pytest.raises(ValueError, match="chunk_elements"):
        S.quantize_checkpoint(small_ckpt, tmp_path / "a", chunk_elements=0)
    with pytest.raises(FileNotFoundError, match="config.json"):
        S.quantize_checkpoint(tmp_path, tmp_path / "a")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in small_ckpt.iterdir():
        (broken / f.name).symlink_to(f)
    # a checkpoint whose last shard (and its index entries) is gone
    index = json.loads((small_ckpt / "model.safetensors.index.json").read_text())
    victim = _shards(small_ckpt)[-1].name
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != victim}
    (broken / "model.safetensors.index.json").unlink()
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    (broken / victim).unlink()
    with pytest.raises(ValueError, match="missing tensors"):
        S.quantize_checkpoint(broken, tmp_path / "b", progress=False)


RSS_SCRIPT = """
import json, resource, sys
import torch, transformers  # noqa: F401  (imports are part of the baseline)
from metal_marlin_torch.io.streaming import quantize_checkpoint
from metal_marlin_torch.nn import QuantConfig
from metal_marlin_torch.io.skeleton import hf_skeleton

hf_skeleton(json.load(open(sys.argv[1] + "/config.json")))  # warm the model classes
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
quantize_checkpoint(sys.argv[1], sys.argv[2], QuantConfig(format="int4", group_size=64), chunk_elements=1 << 17,
                    progress=False)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"base_kib": base, "peak_kib": peak}))
"""


def test_peak_rss_bounded(tmp_path: Path) -> None:
    src = tmp_path / "src"
    total = write_checkpoint(src, llama_config(384, 1024, 8, vocab=2048), shard_bytes=4 * 2**20)
    largest = max(p.stat().st_size for p in _shards(src))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(RSS_SCRIPT), str(src), str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rss = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = (rss["peak_kib"] - rss["base_kib"]) * 1024
    print(f"checkpoint {total / 2**20:.1f} MiB, largest shard {largest / 2**20:.1f} MiB, "
          f"{len(_shards(src))} shards, peak RSS growth {growth / 2**20:.1f} MiB")
    # holding the model would cost at least `total`; streaming holds about one shard
    assert growth < 0.3 * total
    assert growth < 4 * largest


def test_cli_quantize_streams_sharded_sources(small_ckpt: Path, tmp_path: Path, capsys) -> None:
    from metal_marlin_torch.cli import main  # noqa: PLC0415

    assert main(["quantize", str(small_ckpt), str(tmp_path / "cli"), "--format", "int4", "--group-size", "32"]) == 0
    assert "shards written" in capsys.readouterr().out  # the streaming summary, not the in-memory one
    assert (tmp_path / "cli" / S.MANIFEST).is_file()
    _, ref = reference_state(small_ckpt, QuantConfig(format="int4", group_size=32))
    got = read_tensors(tmp_path / "cli")
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
