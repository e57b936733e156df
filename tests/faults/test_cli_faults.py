"""Every CLI fault of issue 19 ends in one line on stderr and a non-zero exit code, and leaves
no partial output.

Faults are real where the machine allows it (truncated files, a file where a folder is
expected, a file-size limit that makes the kernel fail the write) and injected where it does
not: a full disk is an ``OSError(ENOSPC)`` from the shard writer (no small file system can be
mounted without privileges), and a read-only folder is a ``PermissionError`` from ``mkdir`` when
the tests run as root (root ignores folder permissions).
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from metal_marlin_torch.cli import main
from metal_marlin_torch.io import checkpoint as C
from metal_marlin_torch.io import load_quantized

ROOT = Path(__file__).resolve().parents[2]
INT4 = ["--format", "int4", "--group-size", "32"]  # every layer of the tiny model (K = 64, 128)


def run(argv: list[str], capsys) -> tuple[int, str]:
    """``marlin ARGV``: its exit code and its stderr, checked to be one error line."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line]  # (progress bars may precede it)
    assert code != 0, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith(f"marlin {argv[0]}: error: "), err
    assert err.rstrip().endswith(lines[0]), err
    return code, lines[0]


def assert_no_partial(out: Path) -> None:
    """Neither ``out`` nor a staging folder or temporary file beside it."""
    assert not out.exists(), sorted(p.name for p in out.iterdir()) if out.is_dir() else out
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    assert leftovers == []


def truncated_copy(src: Path, dst: Path, file: str = "model.safetensors") -> Path:
    shutil.copytree(src, dst)
    f = dst / file
    f.write_bytes(f.read_bytes()[: f.stat().st_size * 2 // 3])
    return dst


def no_space(after: int = 0):
    """A ``safetensors.torch.save_file`` that writes part of the file and then fails as it does
    on a full disk (the error text of safetensors 0.8), after ``after`` successful calls."""
    real = C.save_file
    calls = {"n": 0}

    def save_file(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] > after:
            Path(filename).write_bytes(b"\0" * 1000)  # the part that fit
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, filename, metadata=metadata)

    return save_file


# --- output paths ---------------------------------------------------------------------------

def test_output_is_an_existing_file(tiny_src, tmp_path, capsys):
    out = tmp_path / "taken"
    out.write_text("not a folder")
    _, line = run(["quantize", str(tiny_src), str(out)], capsys)
    assert f"output {out} exists and is not a directory" in line
    assert out.read_text() == "not a folder"


def test_output_in_read_only_folder(tiny_src, tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root writes anyway: the kernel's answer for everyone else, injected
        real = Path.mkdir

        def mkdir(self, *args, **kwargs):
            if Path(self).parent == ro:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return real(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", mkdir)
    try:
        _, line = run(["quantize", str(tiny_src), str(ro / "out"), *INT4], capsys)
        assert "cannot write" in line and "ermission denied" in line and str(ro) in line
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_max_shard_size_too_small(tiny_src, tmp_path, capsys):
    _, line = run(["quantize", str(tiny_src), str(tmp_path / "out"), "--max-shard-size", "1000"], capsys)
    assert "--max-shard-size must be at least 1 MiB" in line
    assert_no_partial(tmp_path / "out")
    assert main(["quantize", str(tiny_src), str(tmp_path / "out"), "--format", "int4", "--group-size", "32",
                 "--max-shard-size", "1MiB"]) == 0  # units are accepted; the model needs two shards
    assert (tmp_path / "out" / C.INDEX_FILE).is_file()


# --- truncated sources ----------------------------------------------------------------------

def test_quantize_truncated_source(tiny_src, tmp_path, capsys):
    src = truncated_copy(tiny_src, tmp_path / "src")
    _, line = run(["quantize", str(src), str(tmp_path / "out")], capsys)
    assert "model.safetensors is truncated" in line
    assert_no_partial(tmp_path / "out")


def test_load_truncated_checkpoint(tiny_ckpt, tmp_path, capsys):
    ckpt = truncated_copy(tiny_ckpt, tmp_path / "ckpt")
    _, line = run(["info", str(ckpt)], capsys)
    assert "model.safetensors is truncated" in line
    with pytest.raises(ValueError, match="truncated"):
        load_quantized(ckpt)


# --- full disk --------------------------------------------------------------------------------

def test_quantize_disk_full(tiny_src, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(C, "save_file", no_space())
    _, line = run(["quantize", str(tiny_src), str(tmp_path / "out"), *INT4], capsys)
    assert "no space left" in line and "model.safetensors" in line
    assert_no_partial(tmp_path / "out")


def test_quantize_disk_full_keeps_previous_checkpoint(tiny_src, tiny_ckpt, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(tiny_ckpt, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(C, "save_file", no_space())
    run(["quantize", str(tiny_src), str(out), "--format", "int8", "--group-size", "32"], capsys)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old checkpoint, untouched
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_quantize_file_size_limit_in_a_child(tiny_src, tmp_path):
    """A real kernel write failure (EFBIG from RLIMIT_FSIZE) in a separate process: one line,
    exit code 2, nothing left behind."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "metal_marlin_torch.cli", "quantize", str(tiny_src), str(out), *INT4]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, preexec_fn=limit, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and proc.stderr.rstrip().endswith(lines[0]), proc.stderr
    assert "no space left to write" in lines[0] and f"{out}/model.safetensors" in lines[0], lines[0]
    assert "File too large" in lines[0] and "Traceback" not in proc.stderr
    assert_no_partial(out)


@pytest.fixture(scope="module")
def sharded_src(tmp_path_factory) -> Path:
    from tests.io.test_streaming import llama_config, write_checkpoint  # noqa: PLC0415

    src = tmp_path_factory.mktemp("sharded")
    write_checkpoint(src, llama_config(64, 128, 3), shard_bytes=120_000)
    return src


def test_stream_disk_full_then_resume(sharded_src, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(C, "save_file", no_space(after=1))
    _, line = run(["quantize", str(sharded_src), str(out), "--format", "int4", "--stream"], capsys)
    assert "no space left" in line and "the same command resumes" in line
    assert not (out / "config.json").exists()  # not a checkpoint yet
    assert [p.name for p in out.glob(".*tmp*")] == []  # and no half-written shard
    monkeypatch.undo()
    assert main(["quantize", str(sharded_src), str(out), "--format", "int4", "--stream"]) == 0
    assert "1 already done" in capsys.readouterr().out
    fresh = tmp_path / "fresh"
    assert main(["quantize", str(sharded_src), str(fresh), "--format", "int4", "--stream"]) == 0
    for shard in sorted(fresh.glob("*.safetensors")):
        a, b = load_file(str(shard)), load_file(str(out / shard.name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stream_disk_full_at_the_progress_file_then_resume(sharded_src, tmp_path, capsys, monkeypatch):
    """The disk fills while the progress file is rewritten after the second shard: that shard is
    on disk but not recorded. The resumed run keeps the first shard as it is (not rewritten),
    redoes the unrecorded one and the rest, and ends equal to an uninterrupted run."""
    from metal_marlin_torch.io import streaming as S  # noqa: PLC0415

    real_json, failed = S.write_json, []

    def write_json(path, data):
        if Path(path).name == S.MANIFEST and len(data.get("shards", {})) == 2 and not failed:
            failed.append(path)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_json(path, data)

    out = tmp_path / "out"
    argv = ["quantize", str(sharded_src), str(out), "--format", "int4", "--stream"]
    monkeypatch.setattr(S, "write_json", write_json)
    _, line = run(argv, capsys)
    assert failed and "no space left" in line.lower(), line
    recorded = json.loads((out / S.MANIFEST).read_text())["shards"]
    assert len(recorded) == 1, recorded  # the progress file on disk is the last whole one
    first = out / next(iter(recorded))
    first_stat = first.stat()
    assert not (out / "config.json").exists()
    assert [p.name for p in out.glob(".*tmp*")] == []
    monkeypatch.undo()

    written = []
    real_save = C.save_file

    def counting_save(tensors, filename, metadata=None):
        written.append(Path(filename))
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(C, "save_file", counting_save)
    assert main(argv) == 0
    assert "1 already done" in capsys.readouterr().out
    n_shards = len(list(out.glob("*.safetensors")))
    assert n_shards >= 3 and len(written) == n_shards - 1  # everything but the recorded shard
    assert first.stat().st_ino == first_stat.st_ino and first.stat().st_mtime_ns == first_stat.st_mtime_ns
    monkeypatch.undo()
    fresh = tmp_path / "fresh"
    assert main(["quantize", str(sharded_src), str(fresh), "--format", "int4", "--stream"]) == 0
    assert sorted(p.name for p in fresh.glob("*.safetensors")) == sorted(p.name for p in out.glob("*.safetensors"))
    for shard in sorted(fresh.glob("*.safetensors")):
        a, b = load_file(str(shard)), load_file(str(out / shard.name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / S.MANIFEST).read_text())["complete"] is True


# --- import-mlx -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mlx_src(tmp_path_factory) -> Path:
    pytest.importorskip("mlx.core", reason="writes the MLX checkpoint with MLX itself")
    from tests.io.test_mlx_import import write_mlx_llama  # noqa: PLC0415

    path = tmp_path_factory.mktemp("mlx") / "src"
    write_mlx_llama(path, 4, 32, {})
    return path


def test_import_mlx_truncated(mlx_src, tmp_path, capsys):
    src = truncated_copy(mlx_src, tmp_path / "src")
    _, line = run(["import-mlx", str(src), str(tmp_path / "out")], capsys)
    assert "model.safetensors is truncated" in line
    assert_no_partial(tmp_path / "out")


def test_import_mlx_disk_full(mlx_src, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(C, "save_file", no_space())
    _, line = run(["import-mlx", str(mlx_src), str(tmp_path / "out")], capsys)
    assert "no space left" in line
    assert_no_partial(tmp_path / "out")


# --- generate / eval --------------------------------------------------------------------------

def test_generate_empty_prompt(tiny_ckpt, capsys):
    _, line = run(["generate", str(tiny_ckpt), "", "--device", "cpu"], capsys)
    assert "PROMPT is empty" in line


def test_generate_on_encoder(encoder_ckpt, capsys):
    _, line = run(["generate", str(encoder_ckpt), "hello", "--device", "cpu"], capsys)
    assert "is a BertModel (an encoder), not a causal language model" in line


def test_eval_on_encoder(encoder_ckpt, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("some text to score " * 50)
    _, line = run(["eval", str(encoder_ckpt), "--text", str(text)], capsys)
    assert "not a causal language model" in line and "--sentences" in line


def test_eval_reference_of_another_vocabulary(tiny_ckpt, tmp_path, capsys):
    from tests.faults.conftest import save_tiny_llama  # noqa: PLC0415

    other = save_tiny_llama(tmp_path / "other", vocab=512)
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 40)
    _, line = run(["eval", str(tiny_ckpt), "--reference", str(other), "--text", str(text)], capsys)
    assert "vocabulary of 512 tokens" in line and "4096" in line


def test_unexpected_errors_are_one_line_and_v_shows_the_traceback(tiny_ckpt, capsys, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("something nobody planned for\nsecond line")

    monkeypatch.setattr("metal_marlin_torch.io.read_config", boom)
    code, line = run(["info", str(tiny_ckpt)], capsys)
    assert code == 1 and "RuntimeError: something nobody planned for (run with -v" in line
    assert main(["-v", "info", str(tiny_ckpt)]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_json_report_is_atomic(tiny_ckpt, tmp_path, capsys, monkeypatch):
    """``eval --json`` to a full disk: the earlier report stays whole."""
    report = tmp_path / "r.json"
    report.write_text(json.dumps({"old": 1}))
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 40)

    def full(self, data, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_text", full)
    run(["eval", str(tiny_ckpt), "--text", str(text), "--tokens", "64", "--seq-len", "32", "--json",
         str(report)], capsys)
    monkeypatch.undo()
    assert json.loads(report.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
