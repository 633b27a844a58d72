"""`kiln cache merge OUT IN [IN ...]`: merge timing caches from several builds (machines of one kind, CI shards)
into one; `kiln cache show CACHE`: what a cache holds, per op and tactic."""

from __future__ import annotations

import argparse
import collections
import os
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("cache", help="merge or show timing caches",
                       description="Timing caches hold the tactic chosen for each (op signature, shapes, dtypes, "
                                   "device, library versions); a build with a cache times only what it lacks.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    m = actions.add_parser("merge", help="merge caches into OUT (entries already in OUT are kept)")
    m.add_argument("out", help="the merged cache (created, or extended when it exists)")
    m.add_argument("inputs", nargs="+", help="caches to merge in")
    s = actions.add_parser("show", help="count a cache's entries per op and tactic")
    s.add_argument("cache")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kiln.tune.cache import TimingCache, TimingCacheError

    if args.action == "show":
        if not os.path.exists(args.cache):
            raise TimingCacheError(f"timing cache '{args.cache}' does not exist")
        cache = TimingCache(args.cache)
        counts = collections.Counter((e.get("op", "?"), e.get("tactic", "?")) for e in cache.entries.values())
        print(f"{args.cache}: {len(cache)} entries")
        for (op, tactic), n in sorted(counts.items()):
            print(f"  {n:6d}  {op:24s} {tactic}")
        return 0
    merged = TimingCache(args.out)
    before = len(merged)
    for path in args.inputs:
        if not os.path.exists(path):
            raise TimingCacheError(f"timing cache '{path}' does not exist", hint="check the path")
        added = merged.merge(TimingCache(path))
        print(f"{path}: {added} new entries")
    merged.save()
    print(f"{args.out}: {len(merged)} entries ({len(merged) - before} added)")
    return 0
