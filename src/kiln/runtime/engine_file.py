"""The `.kiln` engine file: pure data, checked on load.

    offset  size   content
    0       8      magic b"KILNENG\\0"
    8       4      format version (u32, little endian)
    12      8      header length H (u64)
    20      H      header: UTF-8 JSON (metadata, device fingerprint, plan, graph)
    20+H    8      weights length W (u64)
    28+H    W      weights: a safetensors blob
    28+H+W  32     SHA-256 of every byte before it

Loading never unpickles and never executes anything carried in the file: the header is JSON, the weights are
safetensors, and kernels are regenerated from the plan.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from typing import Any

import torch

from kiln.utils.errors import EngineFileError

MAGIC = b"KILNENG\x00"
FORMAT_VERSION = 1
_HASH = 32


@dataclass
class EngineBlob:
    header: dict[str, Any]
    weights: dict[str, torch.Tensor]


def dumps(header: dict[str, Any], weights: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    blob = save({k: v.detach().cpu().contiguous() for k, v in sorted(weights.items())}) if weights else b""
    body = b"".join([MAGIC, struct.pack("<I", FORMAT_VERSION), struct.pack("<Q", len(head)), head,
                     struct.pack("<Q", len(blob)), blob])
    return body + hashlib.sha256(body).digest()


def write(path: str | os.PathLike[str], header: dict[str, Any], weights: dict[str, torch.Tensor]) -> int:
    data = dumps(header, weights)
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return len(data)


def loads(data: bytes, where: str = "<bytes>") -> EngineBlob:
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        raise EngineFileError(f"'{where}' is not a kiln engine file (wrong magic bytes)",
                              hint="build one with `kiln build MODEL.onnx -o MODEL.kiln`")
    if len(data) < 20:
        raise EngineFileError(f"'{where}' is truncated ({len(data)} bytes)", hint="rebuild or re-copy the engine")
    (version,) = struct.unpack_from("<I", data, 8)
    if version > FORMAT_VERSION:
        raise EngineFileError(
            f"'{where}' has engine format version {version}, from a newer kiln; this kiln reads up to version "
            f"{FORMAT_VERSION}",
            hint="upgrade kiln, or rebuild the engine with this version",
        )
    if len(data) < 20 + _HASH or hashlib.sha256(data[:-_HASH]).digest() != data[-_HASH:]:
        raise EngineFileError(
            f"'{where}' is corrupted or truncated (checksum mismatch, {len(data)} bytes)",
            hint="re-copy the file or rebuild the engine",
        )
    try:
        (hlen,) = struct.unpack_from("<Q", data, 12)
        header = json.loads(data[20:20 + hlen].decode("utf-8"))
        (wlen,) = struct.unpack_from("<Q", data, 20 + hlen)
        blob = data[28 + hlen:28 + hlen + wlen]
        if 28 + hlen + wlen + _HASH != len(data):
            raise ValueError("section lengths do not add up")
    except (ValueError, struct.error, UnicodeDecodeError) as e:
        raise EngineFileError(f"'{where}' is malformed: {e}", hint="rebuild the engine") from None
    weights: dict[str, torch.Tensor] = {}
    if blob:
        from safetensors.torch import load

        weights = load(blob)
    return EngineBlob(header, weights)


def read(path: str | os.PathLike[str]) -> EngineBlob:
    p = os.fspath(path)
    if not os.path.exists(p):
        raise EngineFileError(f"engine file '{p}' not found")
    with open(p, "rb") as f:
        data = f.read()
    return loads(data, p)
