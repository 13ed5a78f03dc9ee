"""read_idx on malformed input: every failure is an IdxFormatError naming the file."""

import gzip
from pathlib import Path

import numpy as np
import pytest

import vitlab.data as vd


def _idx(data: np.ndarray, code: int = 0x08) -> bytes:
    header = bytes([0, 0, code, data.ndim]) + b"".join(d.to_bytes(4, "big") for d in data.shape)
    return header + data.tobytes()


@pytest.fixture
def array() -> np.ndarray:
    return np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)


@pytest.mark.parametrize("compress", [False, True])
def test_round_trip(tmp_path: Path, array: np.ndarray, compress: bool) -> None:
    # no .gz suffix on the compressed file: detection goes by the magic bytes
    path = tmp_path / "ok-idx3-ubyte"
    blob = _idx(array)
    path.write_bytes(gzip.compress(blob) if compress else blob)
    out = vd.read_idx(path)
    assert out.flags.writeable
    np.testing.assert_array_equal(out, array)


def _bad(name: str, array: np.ndarray) -> bytes:
    blob = _idx(array)
    if name == "truncated":
        return blob[:-5]
    if name == "too_long":
        return blob + b"\x00\x01"
    if name == "wrong_magic":
        return b"\x01\x02" + blob[2:]
    if name == "wrong_dtype":
        return _idx(array.astype(">i4"), code=0x0C)
    if name == "corrupt_gzip":
        packed = bytearray(gzip.compress(blob + bytes(1000)))
        middle = len(packed) // 2
        packed[middle : middle + 8] = bytes(b ^ 0xFF for b in packed[middle : middle + 8])
        return bytes(packed)
    if name == "truncated_gzip":
        return gzip.compress(blob)[:-12]
    if name == "empty":
        return b""
    if name == "header_only":
        return blob[:6]
    raise AssertionError(name)


@pytest.mark.parametrize(
    ("name", "pattern"),
    [
        ("truncated", "truncated.*need 24 data bytes, found 19"),
        ("too_long", "too long.*need 24 data bytes, found 26"),
        ("wrong_magic", "magic 0102"),
        ("wrong_dtype", "0x0c.*int32.*uint8"),
        ("corrupt_gzip", "gzip"),
        ("truncated_gzip", "gzip"),
        ("empty", "empty"),
        ("header_only", "too short"),
    ],
)
def test_bad_idx_names_the_file(tmp_path: Path, array: np.ndarray, name: str, pattern: str) -> None:
    path = tmp_path / f"{name}-idx3-ubyte.gz"
    path.write_bytes(_bad(name, array))
    with pytest.raises(vd.IdxFormatError, match=pattern) as info:
        vd.read_idx(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(vd.DatasetNotFoundError, match="absent-idx1-ubyte"):
        vd.read_idx(tmp_path / "absent-idx1-ubyte")
