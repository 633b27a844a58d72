"""`kiln check MODEL.onnx`: list every unsupported or suspicious node at once; exit 0 only if all is supported."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("check", help="report every unsupported or suspicious node of an ONNX model",
                       description="Import MODEL and list every problem found, in one pass. Exit code 0 only when "
                                   "the whole model is supported (warnings do not fail the check).")
    p.add_argument("model", help="path to an .onnx file")
    p.add_argument("--ops", action="store_true", help="also list the model's op types with counts")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kiln.frontend.onnx.capability import check_model, format_report

    report = check_model(args.model)
    if args.json:
        print(json.dumps({
            "model": report.path,
            "nodes": report.n_nodes,
            "ops": dict(sorted(report.ops.items())),
            "supported": report.supported,
            "problems": [p.__dict__ for p in report.problems],
        }, indent=2))
    else:
        print(format_report(report, show_ops=args.ops))
    return 0 if report.supported else 1
