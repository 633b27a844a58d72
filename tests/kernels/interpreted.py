"""Kernel checks under Triton's CPU interpreter, in worker processes.

`TRITON_INTERPRET=1` must be set before triton is imported, and an out-of-bounds store can kill the process, so
each family's cases run in workers that write one JSON line per case (flushed as they go) and the tests read
those lines. `run_workers` starts the workers side by side and collects their records; `main` is the generic
worker for a cases module with `CASES` (names) and `run_case(name)`:

    TRITON_INTERPRET=1 PYTHONPATH=src:. python -m tests.kernels.interpreted MODULE SHARD/SHARDS OUT.jsonl

writes {"name": ..., "result": run_case(name)} or {"name": ..., "error": traceback} per case of its shard.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import traceback
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def run_workers(workers: Mapping[str, Sequence[str]], tmp: Path, *, key: str = "name",
                timeout: float = 600) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Run `python -W ignore *args OUT.jsonl` for every worker at once under the interpreter; returns each record
    by its `key` field (a later line for the same key wins) and, per worker, {"returncode", "log"}."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "KILN_CACHE_DIR": str(tmp / "cache"),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    started = {}
    for name, args in workers.items():
        log = open(tmp / f"{name}.log", "w")  # noqa: SIM115 - closed once the worker has ended
        cmd = [sys.executable, "-W", "ignore", *args, str(tmp / f"{name}.jsonl")]
        started[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log)
    records: dict[str, dict[str, Any]] = {}
    ended: dict[str, dict[str, Any]] = {}
    for name, (p, log) in started.items():
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        log.close()
        out = tmp / f"{name}.jsonl"
        for line in out.read_text().splitlines() if out.exists() else []:
            rec = json.loads(line)
            records[rec[key]] = rec
        ended[name] = {"returncode": p.returncode, "log": (tmp / f"{name}.log").read_text()[-3000:]}
    return records, ended


def run_cases(module: str, tmp: Path, shards: int = 1) -> tuple[dict[str, dict[str, Any]], str]:
    """Every case of `module` through `main` in `shards` workers: {name: record} and the workers' logs."""
    workers = {f"shard{i}": ["-m", "tests.kernels.interpreted", module, f"{i}/{shards}"] for i in range(shards)}
    records, ended = run_workers(workers, tmp)
    logs = "\n".join(f"{w} exited {e['returncode']}: {e['log']}" for w, e in ended.items())
    return records, logs


def case_result(interpreted: tuple[dict[str, dict[str, Any]], str], name: str) -> Any:
    """Case `name`'s result from a `run_cases` run; fails the calling test when the worker died before it or the
    case raised."""
    results, log = interpreted
    assert name in results, f"no result for {name} (did the runner die?)\n{log}"
    rec = results[name]
    assert "error" not in rec, rec.get("error")
    return rec["result"]


def main(argv: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("set TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    warnings.simplefilter("ignore")  # why: numpy warns on the inf/NaN the special-value cases compute on purpose
    import numpy as np

    np.seterr(all="ignore")
    cases = importlib.import_module(argv[1])
    shard, shards = (int(p) for p in argv[2].split("/"))
    names = [n for i, n in enumerate(cases.CASES) if i % shards == shard]
    with open(argv[3], "w") as f:
        for name in names:
            try:
                rec = {"name": name, "result": cases.run_case(name)}
            except Exception:
                rec = {"name": name, "error": traceback.format_exc(limit=6)[-3000:]}
            f.write(json.dumps(rec) + "\n")
            f.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
