"""The engine file: round trip, and every way loading must fail clearly."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import kiln
from kiln.runtime import engine_file
from kiln.utils.errors import EngineFileError


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w")
    b = onnx.numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Add", ["h", "b"], ["t"]),
         helper.make_node("Relu", ["t"], ["y"], name="relu")],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [w, b])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


X = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)


@pytest.fixture()
def engine_path(tmp_path: Path) -> Path:
    p = tmp_path / "m.kiln"
    kiln.build(_model()).save(p)
    return p


def test_round_trip(engine_path: Path) -> None:
    out = kiln.load(engine_path).create_context().run({"x": X})["y"]
    np.testing.assert_allclose(out, kiln.run_reference(_model(), {"x": X})["y"], rtol=1e-6)


def _rewrite(path: Path, edit) -> None:
    """Change the header and re-seal the file with a valid checksum (a well-formed but different engine)."""
    data = path.read_bytes()
    (hlen,) = struct.unpack_from("<Q", data, 12)
    header = json.loads(data[20:20 + hlen])
    edit(header)
    (wlen,) = struct.unpack_from("<Q", data, 20 + hlen)
    path.write_bytes(_seal(header, data[28 + hlen:28 + hlen + wlen]))


def _seal(header: dict, weights: bytes) -> bytes:
    head = json.dumps(header, sort_keys=True).encode()
    body = b"".join([engine_file.MAGIC, struct.pack("<I", engine_file.FORMAT_VERSION), struct.pack("<Q", len(head)),
                     head, struct.pack("<Q", len(weights)), weights])
    return body + hashlib.sha256(body).digest()


def test_not_a_kiln_file(tmp_path: Path) -> None:
    p = tmp_path / "model.kiln"
    onnx.save(_model(), p)
    with pytest.raises(EngineFileError, match="not a kiln engine file"):
        kiln.load(p)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(EngineFileError, match="not found"):
        kiln.load(tmp_path / "none.kiln")


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.99])
def test_truncated(engine_path: Path, keep: float) -> None:
    data = engine_path.read_bytes()
    engine_path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(EngineFileError, match=r"truncated|corrupted"):
        kiln.load(engine_path)


@pytest.mark.parametrize("where", [0.3, 0.7])
def test_flipped_byte(engine_path: Path, where: float) -> None:
    data = bytearray(engine_path.read_bytes())
    data[int(len(data) * where)] ^= 0x01
    engine_path.write_bytes(bytes(data))
    with pytest.raises(EngineFileError, match="corrupted"):
        kiln.load(engine_path)


def test_newer_format_version(engine_path: Path) -> None:
    data = bytearray(engine_path.read_bytes())
    struct.pack_into("<I", data, 8, engine_file.FORMAT_VERSION + 1)
    engine_path.write_bytes(bytes(data))
    with pytest.raises(EngineFileError, match="newer kiln") as e:
        kiln.load(engine_path)
    assert "upgrade kiln" in str(e.value)


def _foreign(header: dict) -> None:
    header["device"] = {"kind": "cuda", "name": "NVIDIA A100-SXM4-80GB", "arch": "sm_80", "sm_count": 108,
                        "memory_bytes": 85_000_000_000}


def test_foreign_device_names_both_devices(engine_path: Path) -> None:
    _rewrite(engine_path, _foreign)
    with pytest.raises(EngineFileError) as e:
        kiln.load(engine_path)
    msg = str(e.value)
    assert "built on NVIDIA A100-SXM4-80GB (sm_80)" in msg and "this is" in msg and "retune=True" in msg


def test_retune_rebuilds_for_this_device(engine_path: Path) -> None:
    _rewrite(engine_path, _foreign)
    engine = kiln.load(engine_path, retune=True)
    assert engine.device_info.kind == "cpu"
    np.testing.assert_allclose(engine.create_context().run({"x": X})["y"],
                               kiln.run_reference(_model(), {"x": X})["y"], rtol=1e-6)


def test_loading_is_pure_data(engine_path: Path) -> None:
    # The header is JSON and the weights safetensors; nothing in the file is ever executed or unpickled.
    blob = engine_file.read(engine_path)
    assert isinstance(blob.header, dict) and "plan" in blob.header
    assert b"pickle" not in engine_path.read_bytes() and b"\x80\x04\x95" not in engine_path.read_bytes()


def test_malformed_plan_is_an_engine_error(engine_path: Path) -> None:
    _rewrite(engine_path, lambda h: h["plan"].pop("graph"))
    with pytest.raises(EngineFileError, match="malformed"):
        kiln.load(engine_path)
