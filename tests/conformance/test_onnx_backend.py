"""The ONNX backend conformance suite (shipped in the onnx wheel) against kiln's CPU reference executor."""

from __future__ import annotations

import os
import tempfile

import onnx.backend.test

from tests.conformance.backend import KilnBackend
from tests.conformance.expected_failures import EXPECTED_FAILURES

# The suite writes downloaded and generated model data under ONNX_HOME; keep it out of the user's home.
os.environ.setdefault("ONNX_HOME", tempfile.mkdtemp(prefix="kiln-onnx-home-"))

backend_test = onnx.backend.test.BackendTest(KilnBackend, __name__)
for pattern in EXPECTED_FAILURES:
    backend_test.xfail(f"^{pattern}_cpu$")

globals().update(backend_test.test_cases)
