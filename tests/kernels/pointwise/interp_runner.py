"""Runs a shard of the pointwise cases under the Triton CPU interpreter and writes one JSON line per case:
{"name": ..., "problem": null or what differs}. The test launches it in a subprocess (TRITON_INTERPRET=1 must be set
before triton is imported; a bad store can kill the process, so results are flushed case by case).

    TRITON_INTERPRET=1 PYTHONPATH=src:. python tests/kernels/pointwise/interp_runner.py OUT.jsonl SHARD/SHARDS
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
    warnings.simplefilter("ignore")  # why: numpy warns on the inf/NaN the special-value cases compute on purpose
    import numpy as np

    np.seterr(all="ignore")
    from tests.kernels.pointwise.cases import CASES, run_case

    shard, shards = (int(p) for p in argv[2].split("/"))
    names = [n for i, n in enumerate(CASES) if i % shards == shard]
    with open(argv[1], "w") as f:
        for name in names:
            try:
                problem = run_case(name)
            except Exception:
                problem = traceback.format_exc(limit=4)[-3000:]
            f.write(json.dumps({"name": name, "problem": problem}) + "\n")
            f.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
