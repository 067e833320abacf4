"""The binary tensor data extension of the Open Inference Protocol v2 (Triton's, which KServe shares).

A request or response body is a JSON header, then the raw bytes of some tensors, in the order of the header's
inputs (or outputs). The `Inference-Header-Content-Length` HTTP header gives the JSON header's length; a tensor
sent as bytes carries `"parameters": {"binary_data_size": n}` instead of `data`. Bytes are little-endian, row-major,
without padding; a BOOL is one byte (0 or 1); a BYTES element is a 4-byte little-endian length and that many bytes.

Every size is checked against the body before anything is allocated: the body itself is already bounded by the
request-size limit (`max_payload_bytes`, enforced by the middleware). Each problem is a 400 that says what was
wrong (`ProblemError`; on /v2 paths its body is the protocol's `{"error": ...}`).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
from fastapi import Response

from service.api.errors import ProblemError

HEADER_LENGTH = "inference-header-content-length"  # HTTP header names are case-insensitive
BINARY_MEDIA_TYPE = "application/octet-stream"
MAX_DIMS = 8

# the numeric datatypes as little-endian numpy types; BYTES (length-prefixed elements) is handled apart
DTYPES: dict[str, np.dtype] = {name: np.dtype(code) for name, code in {
    "BOOL": "|b1", "UINT8": "|u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "|i1",
    "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}.items()}
BYTES = "BYTES"


def bad_binary(detail: str) -> ProblemError:
    return ProblemError(400, "invalid_binary_data", detail)


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """(the JSON header, the tensor bytes after it) of a request body. Without `Inference-Header-Content-Length`
    the whole body is the JSON header."""
    if header_length is None:
        return body, memoryview(b"")
    text = header_length.strip()
    if not text.isascii() or not text.isdigit():
        raise bad_binary(f"Inference-Header-Content-Length must be a whole number of bytes, not {header_length!r}")
    length = int(text)
    if length > len(body):
        raise bad_binary(f"Inference-Header-Content-Length is {length} but the body has only {len(body)} bytes")
    if length == 0:
        raise bad_binary("Inference-Header-Content-Length is 0: the JSON header cannot be empty")
    view = memoryview(body)
    return bytes(view[:length]), view[length:]


def binary_size(name: str, parameters: dict[str, Any] | None) -> int | None:
    """The `binary_data_size` an input declares (None: its data is in the JSON)."""
    if not parameters or "binary_data_size" not in parameters:
        return None
    size = parameters["binary_data_size"]
    if type(size) is not int or size < 0:  # bool is an int subclass: refused too
        raise bad_binary(f"input {name!r}: binary_data_size must be a whole number of bytes >= 0, not {size!r}")
    return size


def take_inputs(sizes: Sequence[tuple[str, int | None]], tensor_bytes: memoryview) -> list[memoryview | None]:
    """The bytes of each input that declares a `binary_data_size`, in input order; every byte must belong to one."""
    taken: list[memoryview | None] = []
    offset = 0
    for name, size in sizes:
        if size is None:
            taken.append(None)
            continue
        if size > len(tensor_bytes) - offset:
            hint = "" if len(tensor_bytes) else " (send Inference-Header-Content-Length with binary data)"
            raise bad_binary(f"input {name!r} declares binary_data_size {size} but only {len(tensor_bytes) - offset} "
                             f"bytes of binary data are left after the JSON header{hint}")
        taken.append(tensor_bytes[offset:offset + size])
        offset += size
    if offset != len(tensor_bytes):
        raise bad_binary(f"the body has {len(tensor_bytes) - offset} bytes after the JSON header that no input "
                         "declares (binary_data_size)")
    return taken


def check_shape(name: str, shape: Sequence[int]) -> int:
    """The element count of a tensor shape (a Python int: no overflow on absurd shapes)."""
    if len(shape) > MAX_DIMS or any(d < 0 for d in shape):
        raise bad_binary(f"input {name!r}: shape {list(shape)} is not a valid tensor shape")
    return math.prod(shape)


def binary_array(name: str, datatype: str, shape: Sequence[int], data: memoryview) -> np.ndarray:
    """A numeric tensor from its bytes: the byte count must be exactly the shape's elements times the type's size.
    A view on the body (no copy); BOOL bytes must be 0 or 1."""
    dtype = DTYPES.get(datatype)
    if dtype is None:
        raise ProblemError(422, "unsupported_datatype", f"input {name!r}: datatype {datatype!r} is not supported as "
                           f"binary data (use one of {', '.join(DTYPES)})")
    count = check_shape(name, shape)
    if count * dtype.itemsize != len(data):
        raise bad_binary(f"input {name!r}: shape {list(shape)} of {datatype} needs {count * dtype.itemsize} bytes "
                         f"but binary_data_size is {len(data)}")
    if datatype == "BOOL":
        raw = np.frombuffer(data, dtype=np.uint8)
        if (raw > 1).any():
            raise bad_binary(f"input {name!r}: BOOL bytes must be 0 or 1")
    return np.frombuffer(data, dtype=dtype).reshape(tuple(shape))


def bytes_elements(name: str, shape: Sequence[int], data: memoryview) -> list[bytes]:
    """The elements of a BYTES tensor (each a 4-byte little-endian length, then the bytes); there must be exactly
    as many as the shape says, filling the data exactly."""
    count = check_shape(name, shape)
    if count * 4 > len(data):  # every element takes at least its 4-byte length
        raise bad_binary(f"input {name!r}: shape {list(shape)} of BYTES needs at least {count * 4} bytes but "
                         f"binary_data_size is {len(data)}")
    elements, offset = [], 0
    for index in range(count):
        if len(data) - offset < 4:
            raise bad_binary(f"input {name!r}: BYTES element {index} has no 4-byte length (the data ends)")
        (length,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if length > len(data) - offset:
            raise bad_binary(f"input {name!r}: BYTES element {index} declares {length} bytes but only "
                             f"{len(data) - offset} are left")
        elements.append(bytes(data[offset:offset + length]))
        offset += length
    if offset != len(data):
        raise bad_binary(f"input {name!r}: {len(data) - offset} bytes are left after the {count} BYTES elements "
                         "the shape declares")
    return elements


def output_bytes(datatype: str, values: Any) -> bytes:
    """A numeric output tensor's bytes (little-endian, row-major)."""
    return np.ascontiguousarray(np.asarray(values, dtype=DTYPES[datatype])).tobytes()


def binary_response(header: dict[str, Any], blobs: Sequence[bytes], headers: dict[str, str] | None = None) -> Response:
    """A response of the extension: the JSON header, then the outputs' bytes (in the header's output order)."""
    head = json.dumps(header, separators=(",", ":")).encode()
    return Response(b"".join([head, *blobs]), media_type=BINARY_MEDIA_TYPE,
                    headers={**(headers or {}), "Inference-Header-Content-Length": str(len(head))})
