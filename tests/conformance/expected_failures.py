"""Every ONNX backend-suite case kiln does not pass, with the reason, by family.

Each entry is a regular expression matched against the test name (without the `_cpu` suffix). Cases listed here
still run: an unexpected pass fails the run, so this list can only shrink.
"""

from __future__ import annotations

EXPECTED_FAILURES: dict[str, str] = {
}
