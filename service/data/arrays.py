""".npy and .npz bytes from a client, read with their declared sizes checked before anything is allocated.

numpy trusts an array header: reading a 200-byte .npy that declares shape (256, 1, 4096, 4096) float64 first
allocates 32 GiB. Here the header is parsed alone, its declared byte count must equal the bytes that follow it
(and, in an .npz, the member's declared size), and the element count must be within the caller's limit; only
then is the payload copied. Objects (pickles) are never read.
"""

from __future__ import annotations

import io
import math
import zipfile
from typing import IO

import numpy as np

NUMERIC_KINDS = "biuf"  # bool, signed and unsigned integers, floats


class ArrayFileError(ValueError):
    """A bad array file; `code` is machine-readable ('corrupt_npy', 'array_too_large', 'invalid_tensor')."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _header(stream: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of an .npy header; the stream is left at the first data byte."""
    try:
        version = np.lib.format.read_magic(stream)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(stream)
    except Exception as exc:  # noqa: BLE001 - numpy parses the header as a Python literal; a hostile one raises
        # ValueError, SyntaxError, tokenize.TokenError, RecursionError, ...
        raise ArrayFileError("corrupt_npy", f"unreadable .npy header: {exc}") from exc
    if dtype.hasobject:
        raise ArrayFileError("corrupt_npy", "the array holds Python objects (a pickle), which are never read")
    if dtype.kind not in NUMERIC_KINDS or dtype.fields is not None:
        raise ArrayFileError("invalid_tensor", f"the array must hold numbers, not dtype {dtype}")
    return tuple(int(n) for n in shape), bool(fortran), dtype


def _checked_count(shape: tuple[int, ...], dtype: np.dtype, payload: int, max_elements: int, what: str) -> int:
    count = math.prod(shape)
    if count > max_elements:
        raise ArrayFileError("array_too_large", f"{what} declares shape {list(shape)} ({count} values), over the "
                             f"limit of {max_elements}")
    if count * dtype.itemsize != payload:
        raise ArrayFileError("corrupt_npy", f"{what} declares shape {list(shape)} of {dtype} "
                             f"({count * dtype.itemsize} bytes) but holds {payload} bytes of data")
    return count


def _array(data: bytes, shape: tuple[int, ...], fortran: bool, dtype: np.dtype) -> np.ndarray:
    flat = np.frombuffer(data, dtype=dtype)
    return flat.reshape(shape, order="F" if fortran else "C").copy(order="C")


def read_npy(data: bytes, max_elements: int, what: str = "the .npy file") -> np.ndarray:
    """One .npy file's array; ArrayFileError when its header lies about its size, it holds more than
    `max_elements` values, or anything but numbers."""
    stream = io.BytesIO(data)
    shape, fortran, dtype = _header(stream)
    start = stream.tell()
    _checked_count(shape, dtype, len(data) - start, max_elements, what)
    return _array(data[start:], shape, fortran, dtype)


def read_npz(data: bytes, max_elements: int, max_bytes: int, what: str = "the .npz file") -> dict[str, np.ndarray]:
    """Every array of an .npz archive by name (without '.npy'); the members' declared sizes (zip and .npy
    headers) are checked against each other and against `max_bytes` / `max_elements` (all members together)
    before any is decompressed."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = [m for m in archive.infolist() if not m.is_dir()]
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise ArrayFileError("corrupt_archive", f"{what} is not a readable .npz (zip) archive: {exc}") from exc
    declared = sum(m.file_size for m in members)
    if declared > max_bytes:
        raise ArrayFileError("array_too_large", f"{what} unpacks to {declared} bytes, over the limit of {max_bytes}")
    arrays: dict[str, np.ndarray] = {}
    budget = max_elements
    for member in members:
        name = member.filename.removesuffix(".npy")
        label = f"{what}: member {member.filename!r}"
        try:
            with archive.open(member) as stream:
                shape, fortran, dtype = _header(stream)
                payload = member.file_size - stream.tell()
                budget -= _checked_count(shape, dtype, payload, budget, label)
                body = stream.read(payload + 1)
        except ArrayFileError:
            raise
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:  # CRC, truncation
            raise ArrayFileError("corrupt_archive", f"{label} cannot be unpacked: {exc}") from exc
        if len(body) != payload:
            raise ArrayFileError("corrupt_npy", f"{label} holds {len(body)} bytes of data, not the {payload} declared")
        arrays[name] = _array(body, shape, fortran, dtype)
    return arrays
