"""The `kiln` command. Each subcommand lives in its own module with `add_parser(subparsers)` and `run(args)`.

User mistakes and unsupported models print one or two lines and exit non-zero; `--verbose` adds the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

from kiln.utils.errors import KilnError
from kiln.utils.version import __version__

EXIT_ERROR = 2  # a KilnError (bad input, unsupported model, failed check); 1 is left for "ran, but did not pass"


def _parser() -> argparse.ArgumentParser:
    from kiln.cli import bench, build, cache, check, compare, demo, inspect, run

    p = argparse.ArgumentParser(prog="kiln", description="kiln: ONNX in, a fast inference engine out.")
    p.add_argument("--version", action="version", version=f"kiln {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for mod in (build, run, bench, inspect, compare, check, cache, demo):
        mod.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_ERROR
    from kiln.utils import log
    from kiln.utils.env import env

    verbose = args.verbose or env().verbose
    log.setup(verbose)
    try:
        return int(args.func(args) or 0)
    except KilnError as e:
        if verbose:
            traceback.print_exc()
        print(f"kiln {args.command}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `kiln inspect ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
