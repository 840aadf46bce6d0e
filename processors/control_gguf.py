"""GGUF control-vector files, in the layout repeng writes and llama.cpp reads.

A file has ``general.architecture = "controlvector"``, the string
``controlvector.model_hint`` (the model family, e.g. ``llama``), the uint32
``controlvector.layer_count`` (number of direction tensors) and one 1-D F32 tensor
``direction.N`` of length ``D`` (the hidden size) per steered layer.

Layer-index convention: ``direction.N`` is added to the output of transformer block
``N``, counting blocks from 0 — in llama.cpp the tensor lands in ``tensors[N]`` and is
added after block ``il = N``'s final residual add (``l_out``); in transformers this is
``model.model.layers[N]``'s output (``hidden_states[N + 1]``); repeng's layer ``N`` is the
same block. llama.cpp refuses ``direction.0`` (its block 0 cannot be steered); this
server accepts and applies it, but a file holding it will not load in llama.cpp.

Example:
    >>> import numpy as np
    >>> from processors.control import ControlVector
    >>> v = ControlVector("x", {3: np.arange(4, dtype=np.float32)}, model_hint="llama")
    >>> w = read_control_gguf(write_control_gguf(v), "x", hidden_size=4)
    >>> w.layers, w.model_hint, bool((w.directions[3] == v.directions[3]).all())
    ((3,), 'llama', True)
"""

from __future__ import annotations

import os
import re
import struct
import tempfile
from typing import Any

import numpy as np

from processors.control import ControlVector

ARCH = "controlvector"
# ASCII digits only (``\d`` would take '٣'), and few of them: no model has 10**6 blocks,
# and int() of thousands of digits is work an upload should not buy.
_DIRECTION_RE = re.compile(r"^direction\.([0-9]{1,6})$")

# What a control-vector file can legitimately hold: a handful of metadata keys (repeng
# writes 3, llama.cpp tools a few more), short strings, small arrays. The header is
# checked against these before gguf.GGUFReader (which walks arrays element by element
# in Python) ever sees the file.
MAX_KV = 64
MAX_KEY_BYTES = 256
MAX_STRING_BYTES = 4096
MAX_ARRAY_ITEMS = 1024
HEADER_ROOM = 64 * 1024  # metadata and tensor-info bytes allowed beyond the tensor data
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


class GGUFFormatError(ValueError):
    """The body is not a usable control-vector GGUF file; the message says why."""


def write_control_gguf(vector: ControlVector) -> bytes:
    """Serialize ``vector`` as a control-vector GGUF file (repeng's ``export_gguf``)."""
    import gguf

    fd, path = tempfile.mkstemp(suffix=".gguf")
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(path, ARCH)
        writer.add_string(f"{ARCH}.model_hint", vector.model_hint or "")
        writer.add_uint32(f"{ARCH}.layer_count", len(vector.directions))
        for layer, direction in vector.directions.items():
            writer.add_tensor(f"direction.{layer}", np.ascontiguousarray(direction, np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.unlink(path)


def max_control_gguf_bytes(num_layers: int, hidden_size: int) -> int:
    """The largest control-vector file a model of this geometry can need: one F32
    direction of ``hidden_size`` per block (with GGUF's 32-byte alignment and a tensor
    info each), plus :data:`HEADER_ROOM` for the metadata."""
    per_layer = 4 * hidden_size + 32 + 128
    return HEADER_ROOM + num_layers * per_layer


class _Cursor:
    """Bounds-checked little-endian reads over the body (GGUFFormatError past the end)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise GGUFFormatError("the GGUF file does not parse: its header is truncated")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u32(self) -> int:
        return int(struct.unpack("<I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack("<Q", self.take(8))[0])

    def string(self, limit: int, what: str) -> bytes:
        n = self.u64()
        if n > limit:
            raise GGUFFormatError(f"{what} is {n} bytes long; at most {limit} are allowed")
        return self.take(n)


def scan_header(data: bytes, max_tensors: int | None = None) -> None:
    """Check a GGUF header's counts and lengths without building anything (O(header)):
    at most :data:`MAX_KV` metadata entries, keys of at most :data:`MAX_KEY_BYTES`,
    strings of at most :data:`MAX_STRING_BYTES`, arrays of at most
    :data:`MAX_ARRAY_ITEMS` (no nested arrays), at most ``max_tensors`` tensor infos
    with ``direction.N`` names. Raises GGUFFormatError naming the first violation."""
    cur = _Cursor(data)
    if cur.take(4) != b"GGUF":
        raise GGUFFormatError("the body is not a GGUF file (it does not start with 'GGUF')")
    version = cur.u32()
    if version not in (2, 3):
        raise GGUFFormatError(
            f"the GGUF file does not parse: version {version} is not supported (2 or 3)"
        )
    n_tensors, n_kv = cur.u64(), cur.u64()
    if n_kv > MAX_KV:
        raise GGUFFormatError(f"the file has {n_kv} metadata entries; at most {MAX_KV}")
    if max_tensors is not None and n_tensors > max_tensors:
        raise GGUFFormatError(
            f"the file has {n_tensors} tensors; a model with {max_tensors} blocks takes at "
            f"most {max_tensors} directions"
        )
    for _ in range(n_kv):
        key = cur.string(MAX_KEY_BYTES, "a metadata key")
        vtype = cur.u32()
        if vtype == _ARRAY:
            itype, count = cur.u32(), cur.u64()
            if count > MAX_ARRAY_ITEMS:
                raise GGUFFormatError(
                    f"metadata '{key[:64].decode('utf-8', 'replace')}' is an array of "
                    f"{count} items; at most {MAX_ARRAY_ITEMS} are allowed"
                )
            if itype == _STRING:
                for _ in range(count):
                    cur.string(MAX_STRING_BYTES, "a metadata string")
            elif itype in _SCALAR_BYTES:
                cur.take(_SCALAR_BYTES[itype] * count)
            else:
                raise GGUFFormatError(f"metadata array of unsupported type {itype}")
        elif vtype == _STRING:
            cur.string(MAX_STRING_BYTES, "a metadata string")
        elif vtype in _SCALAR_BYTES:
            cur.take(_SCALAR_BYTES[vtype])
        else:
            raise GGUFFormatError(f"metadata value of unknown type {vtype}")
    for _ in range(n_tensors):
        raw = cur.string(MAX_KEY_BYTES, "a tensor name")
        name = raw.decode("utf-8", "replace")
        if _DIRECTION_RE.fullmatch(name) is None:
            raise GGUFFormatError(
                f"unexpected tensor '{name[:64]}': a control-vector file holds only "
                "'direction.N' tensors (N: up to 6 ASCII digits)"
            )
        n_dims = cur.u32()
        if n_dims > 4:
            raise GGUFFormatError(f"tensor '{name}' has {n_dims} dimensions")
        cur.take(8 * n_dims + 4 + 8)  # dims, type, offset


def _string_field(reader: Any, key: str) -> str | None:
    fld = reader.get_field(key)
    if fld is None:
        return None
    try:
        return bytes(fld.parts[fld.data[0]]).decode("utf-8", errors="replace")
    except Exception:  # noqa: BLE001 - a field of another type
        return None


def read_control_gguf(
    data: bytes,
    name: str,
    *,
    hidden_size: int | None = None,
    num_layers: int | None = None,
) -> ControlVector:
    """Parse a control-vector GGUF body into a :class:`ControlVector`.

    Checks, each a :class:`GGUFFormatError` with a clear message: the header passes
    :func:`scan_header` (before any parsing); the body parses as
    GGUF; ``general.architecture`` is ``controlvector`` (when present); there is at least
    one ``direction.N`` tensor and no other tensor; every direction is 1-D F32 of length
    ``hidden_size``; ``N < num_layers``; no layer repeats; values are finite.
    """
    import gguf

    if len(data) < 24 or data[:4] != b"GGUF":
        raise GGUFFormatError("the body is not a GGUF file (it does not start with 'GGUF')")
    scan_header(data, max_tensors=num_layers)
    fd, path = tempfile.mkstemp(suffix=".gguf")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            reader = gguf.GGUFReader(path, "r")
        except Exception as exc:  # noqa: BLE001 - any parse failure is a bad body
            raise GGUFFormatError(f"the GGUF file does not parse: {exc}") from None
        arch = _string_field(reader, "general.architecture")
        if arch is not None and arch != ARCH:
            raise GGUFFormatError(
                f"general.architecture is '{arch}', expected '{ARCH}': this is not a "
                "control-vector file"
            )
        hint = _string_field(reader, f"{ARCH}.model_hint") or ""
        directions: dict[int, np.ndarray] = {}
        for t in reader.tensors:
            m = _DIRECTION_RE.fullmatch(t.name)
            if m is None:
                raise GGUFFormatError(
                    f"unexpected tensor '{t.name}': a control-vector file holds only "
                    "'direction.N' tensors"
                )
            layer = int(m.group(1))
            if t.tensor_type != gguf.GGMLQuantizationType.F32:
                raise GGUFFormatError(
                    f"tensor '{t.name}' has type {t.tensor_type.name}; directions must be F32"
                )
            shape = [int(x) for x in t.shape]
            if len(shape) != 1:
                raise GGUFFormatError(f"tensor '{t.name}' has shape {shape}; directions are 1-D")
            arr = np.array(t.data, dtype=np.float32).reshape(-1)
            if hidden_size is not None and arr.shape[0] != hidden_size:
                raise GGUFFormatError(
                    f"tensor '{t.name}' has length {arr.shape[0]}; the serving model's hidden "
                    f"size is {hidden_size}"
                )
            if num_layers is not None and layer >= num_layers:
                raise GGUFFormatError(
                    f"tensor '{t.name}' is for block {layer}; the serving model has "
                    f"{num_layers} blocks (0-{num_layers - 1})"
                )
            if layer in directions:
                raise GGUFFormatError(f"tensor '{t.name}' appears twice")
            if not np.isfinite(arr).all():
                raise GGUFFormatError(f"tensor '{t.name}' has non-finite values")
            directions[layer] = arr
        if not directions:
            raise GGUFFormatError("the file has no 'direction.N' tensors")
        del reader  # release the memory map before the file goes
    finally:
        os.unlink(path)
    try:
        return ControlVector(name, directions, model_hint=hint)
    except ValueError as exc:
        raise GGUFFormatError(str(exc)) from None


__all__ = ["ARCH", "GGUFFormatError", "read_control_gguf", "write_control_gguf"]
