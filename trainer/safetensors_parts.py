"""Zero-copy safetensors serialization: a file as a list of buffers over the tensors' own memory.

The safetensors format is an 8-byte little-endian header length, a JSON header (names, dtypes,
shapes, byte offsets), padded with spaces to a multiple of 8, then the raw little-endian tensor
bytes. ``safetensors.torch.save`` copies every tensor into one new ``bytes`` (seconds for a
1.5 GB optimizer state, and as much memory again); here the header is the only new allocation
and storage hashes and writes straight from the tensors. ``safetensors`` reads the result.
``tensors`` is the reverse: tensors that are views of the bytearray storage read (and verified)
the file into, where ``safetensors.torch.load`` would first need it copied into ``bytes``.

Invariants: the tensors must not change until the buffers are written (the snapshot owns them);
tensors read by ``tensors`` share the buffer's memory (whoever mutates one mutates the other).
"""

from __future__ import annotations

import json
import struct
import sys

import torch

DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}


def parts(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> list[memoryview]:
    """The file's bytes as [header, tensor bytes ...], in name order."""
    assert sys.byteorder == "little", "safetensors stores little-endian data"
    header: dict = {"__metadata__": metadata} if metadata else {}
    views, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name]
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"{name}: serialize contiguous host tensors (capture them first)")
        raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else None
        size = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        if size:
            views.append(memoryview(raw).cast("B"))
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % 8)
    return [memoryview(struct.pack("<Q", len(blob)) + blob), *views]


NAMES = {v: k for k, v in DTYPES.items()}


def tensors(buf: bytearray) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file held in ``buf``, as views of it (no copy)."""
    assert sys.byteorder == "little", "safetensors stores little-endian data"
    if len(buf) < 8:
        raise ValueError("not a safetensors file: shorter than its header length")
    (n,) = struct.unpack_from("<Q", buf, 0)
    if 8 + n > len(buf):
        raise ValueError("not a safetensors file: the header runs past the end")
    header = json.loads(bytes(buf[8:8 + n]))
    header.pop("__metadata__", None)
    base, out = 8 + n, {}
    for name, entry in header.items():
        dtype = NAMES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"{name}: unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        count = 1
        for d in entry["shape"]:
            count *= d
        size = torch.empty((), dtype=dtype).element_size()
        if not 0 <= begin <= end <= len(buf) - base or end - begin != count * size:
            raise ValueError(f"{name}: data offsets {begin}..{end} do not fit its shape or the file")
        if count == 0:
            out[name] = torch.empty(entry["shape"], dtype=dtype)
        elif (base + begin) % size == 0:
            out[name] = torch.frombuffer(buf, dtype=dtype, count=count, offset=base + begin).view(entry["shape"])
        else:  # misaligned for its dtype: copy this one
            raw = bytearray(buf[base + begin:base + end])
            out[name] = torch.frombuffer(raw, dtype=dtype, count=count).view(entry["shape"])
    return out
