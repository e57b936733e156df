"""Calibration loading: files, folders, token tensors, determinism, disjointness from eval text."""

from __future__ import annotations

import pytest
import torch

from metal_marlin_torch.quant import calibration as C


class CharTokenizer:
    """A tokenizer written for the test: one id per character (its code point mod 256)."""

    def __call__(self, text, add_special_tokens=False, return_attention_mask=False):
        return {"input_ids": [ord(c) % 256 for c in text]}


def ids(text: str) -> torch.Tensor:
    return torch.tensor([ord(c) % 256 for c in text])


def is_window_of(window: torch.Tensor, stream: torch.Tensor) -> bool:
    n = window.numel()
    return any(torch.equal(stream[s:s + n], window) for s in range(stream.numel() - n + 1))


def test_text_file_windows_are_slices_of_the_tokenized_text(tmp_path):
    text = "def f(x):\n    return x * 2\n" * 20
    f = tmp_path / "a.py"
    f.write_text(text)
    w = C.load_calibration(f, CharTokenizer(), n_samples=5, seq_len=16, seed=3)
    assert w.shape == (5, 16) and w.dtype == torch.int64
    assert all(is_window_of(row, ids(text)) for row in w)
    assert torch.equal(w, C.load_calibration(f, CharTokenizer(), n_samples=5, seq_len=16, seed=3))


def test_folder_reads_text_files_sorted(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bbbb")
    (tmp_path / "sub" / "a.md").write_text("aaaa")
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    files = C.text_files(tmp_path)
    assert [f.name for f in files] == ["b.txt", "a.md"]  # sorted by full path: b.txt < sub/a.md
    w = C.load_calibration(tmp_path, CharTokenizer(), n_samples=2, seq_len=10)
    assert all(is_window_of(row, ids("bbbb\n\naaaa")) for row in w)


def test_list_of_files(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("x" * 50)
    b.write_text("y" * 50)
    assert C.text_files([a, b]) == [a, b]


def test_token_tensors():
    stream = torch.arange(100)
    w = C.load_calibration(stream, None, n_samples=3, seq_len=10, seed=0)
    assert w.shape == (3, 10)
    assert all(torch.equal(row, torch.arange(row[0], row[0] + 10)) for row in w)
    fixed = torch.randint(0, 50, (4, 8))
    assert torch.equal(C.load_calibration(fixed, None), fixed)


def test_bad_sources(tmp_path):
    with pytest.raises(ValueError, match="neither a file nor a folder"):
        C.load_calibration(tmp_path / "missing.txt", CharTokenizer())
    with pytest.raises(ValueError, match="fewer than seq_len"):
        C.load_calibration(torch.arange(5), None, seq_len=10)
    with pytest.raises(TypeError, match="int64"):
        C.load_calibration(torch.zeros(4, 4), None)
    with pytest.raises(ValueError, match="tokenizer"):
        (tmp_path / "t.txt").write_text("hello world")
        C.load_calibration(tmp_path / "t.txt", None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no text files"):
        C.text_files(tmp_path / "empty")


def test_default_files_avoid_held_out_packages():
    files = C.default_calibration_files()
    assert len(files) >= 30
    root = C.stdlib_dir()
    for f in files:
        top = f.relative_to(root).parts[0]
        assert top not in C.HELD_OUT_STDLIB_PACKAGES


def test_check_disjoint(tmp_path):
    a = tmp_path / "a.py"
    a.write_text("x")
    C.check_disjoint([a], [tmp_path / "b.py"])
    with pytest.raises(ValueError, match="overlap"):
        C.check_disjoint([a], [tmp_path / "." / "a.py"])
