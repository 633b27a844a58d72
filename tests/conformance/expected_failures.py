"""Every ONNX backend-suite case kiln does not pass, with the reason, by family.

Each key is a regular expression matched against the test name (without the `_cpu` suffix). Cases listed here
still run: an unexpected pass fails the run, so this list can only shrink.
"""

from __future__ import annotations

EXPECTED_FAILURES: dict[str, str] = {
    # Not planned: training.
    r"test_(adagrad|adam|momentum|nesterov_momentum)(_multiple)?": "training-domain optimizer ops: not planned",
    r"test_gradient_of_add(_and_mul)?": "training-domain Gradient op: not planned",
    # Not planned: the ai.onnx.ml domain (classic-ML operators, not neural-network inference).
    r"test_ai_onnx_ml_.*": "ai.onnx.ml domain: not planned",
    # Random values: the expected data is numpy's random stream; ONNX leaves the values unspecified.
    r"test_bernoulli(_double|_seed)?(_expanded)?": "random op compared value-for-value with numpy's generator",
    # The suite's own data or runner.
    r"test_dft_inverse(_opset19)?": (
        "expected data carries numpy's rounding noise (1.9e-7 where the exact value is 0), above the suite's "
        "atol 1e-7; kiln's result differs from it by < 5e-9 of the signal magnitude"
    ),
    r"test_loop16_seq_none": (
        "the onnx runner cannot compare this output (it calls len() on a 0-d array inside the sequence); "
        "kiln's output was checked by hand: same values, dtypes and shapes"
    ),
    # A deliberate semantic choice.
    r"test_maxunpool_export_with_output_shape": (
        "kiln reads MaxUnpool indices as positions in output_shape, as onnxruntime and PyTorch do; the suite's "
        "data indexes the inferred shape and pads it"
    ),
}
