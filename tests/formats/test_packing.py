"""Packing: the bit layout of docs/FORMAT.md §2, checked against a plain Python bit stream."""

import pytest
import torch

from metal_marlin_torch.formats import pack, packed_words, unpack
from tests.reference_formats import pack_row, unpack_row


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("k", [1, 5, 31, 32, 33, 96, 100, 128])
def test_pack_matches_python_bit_stream(bits, k):
    codes = torch.randint(0, 1 << bits, (3, k))
    words = pack(codes, bits)
    assert words.dtype == torch.uint32
    assert words.shape == (3, (k * bits + 31) // 32) == (3, packed_words(k, bits))
    for row in range(3):
        expect = pack_row(codes[row].tolist(), bits)
        assert [int(w) for w in words[row].to(torch.int64)] == expect
        assert unpack_row(expect, bits, k) == codes[row].tolist()


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_round_trip_is_bit_exact(bits):
    codes = torch.randint(0, 1 << bits, (7, 257))
    assert torch.equal(unpack(pack(codes, bits), bits, 257).long(), codes)


def test_known_words():
    # 4 bits: low nibble first
    assert int(pack(torch.arange(8).view(1, 8), 4)[0, 0]) == 0x76543210
    # 3 bits: code 10 straddles words 0 and 1 (bits 30..32)
    codes = torch.zeros(1, 32, dtype=torch.long)
    codes[0, 10] = 0b111
    w = pack(codes, 3)[0].to(torch.int64).tolist()
    assert w == [0b11 << 30, 0b1, 0]
    # 8 bits: one byte per code, little endian
    assert int(pack(torch.tensor([[1, 2, 3, 4]]), 8)[0, 0]) == 0x04030201


def test_bad_input():
    with pytest.raises(ValueError, match="codes must lie in"):
        pack(torch.tensor([[16]]), 4)
    with pytest.raises(ValueError, match="bits must be"):
        pack(torch.tensor([[1]]), 9)
    with pytest.raises(TypeError, match="integer"):
        pack(torch.tensor([[1.0]]), 4)
    with pytest.raises(ValueError, match="words per row"):
        unpack(torch.zeros(2, 3, dtype=torch.uint32), 4, 32)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_byte_and_word_unpack_paths_agree(bits):
    from metal_marlin_torch.formats.packing import _unpack_bytes, _unpack_words

    for k in (1, 9, 64, 100):
        words = pack(torch.randint(0, 1 << bits, (4, k)), bits)
        assert torch.equal(_unpack_bytes(words, bits, k), _unpack_words(words, bits, k))
