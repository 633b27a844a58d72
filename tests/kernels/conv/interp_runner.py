"""Runs Conv cases under the Triton CPU interpreter and writes one JSON line per case:
{"name": ..., "problems": {tile: null or what differs}} (or {"name": ..., "error": traceback}). The test launches it
in a subprocess (TRITON_INTERPRET=1 must be set before triton is imported; a bad store can kill the process, so
results are flushed case by case).

    TRITON_INTERPRET=1 PYTHONPATH=src:. python tests/kernels/conv/interp_runner.py OUT.jsonl [NAME ...]
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings


def main(argv: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("set TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    warnings.simplefilter("ignore")
    from tests.kernels.conv.cases import CASES, run_case

    names = argv[2:] or list(CASES)
    with open(argv[1], "w") as f:
        for name in names:
            try:
                rec = {"name": name, "problems": run_case(name)}
            except Exception:
                rec = {"name": name, "error": traceback.format_exc(limit=6)[-3000:]}
            f.write(json.dumps(rec) + "\n")
            f.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
