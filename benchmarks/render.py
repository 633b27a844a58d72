"""`python -m benchmarks.render RUN.json [--state TEXT] [--results FILE]`: the RESULTS.md section of a run from the
JSON file `benchmarks.run --json` wrote (for runs made with --no-results, or on a machine whose files are gone but
for that JSON). Prints the section; with --results, appends it there. Every number comes from the JSON."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks import report


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.render", description=__doc__.split("\n\n")[0])
    p.add_argument("json", type=Path, help="a file written by `python -m benchmarks.run --json`")
    p.add_argument("--state", default=None, help="a 'kiln state:' line put under the section's header")
    p.add_argument("--results", type=Path, default=None, help="append the section to this file")
    args = p.parse_args(argv)
    env, cases, interrupted = report.read_json(args.json)
    text = report.section(env, cases, interrupted)
    if args.state:
        head, _, rest = text.partition("\n")
        text = f"{head}\n\nkiln state: {args.state}\n{rest}"
    if args.results is not None:
        with args.results.open("a") as f:
            f.write("\n" + text.rstrip() + "\n")
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
