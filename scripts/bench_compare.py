#!/usr/bin/env python3
"""Compare builds from `bench_cuda --json` files of alternating rounds.

Each build is NAME=FILE[,FILE...] (one file per round, e.g. the rounds of
one device call). For every default row (candidates skipped) that all
builds have, prints a markdown table: the time range over the rounds in
us, the range of % of the same-run copy floor, and for each build after the
first the ratio first / build from the worst to the best pairing of
rounds (min first / max build .. max first / min build), the figure
docs/PERFORMANCE.md quotes.

    python3 scripts/bench_compare.py main=m1.json,m2.json new=n1.json,n2.json \\
        [--shapes 16384x4096/64,8192x768/16] [--pass forward]

Rows with a ratio outside 0.98-1.02 at both ends are marked with *.
"""
import argparse
import json
import sys


def load(files):
    rows = {}
    for f in files:
        with open(f) as fh:
            data = json.load(fh)
        for r in data["rows"]:
            if r.get("candidate"):
                continue
            shape = f"{r['rows']}x{r['hidden']}/{r['seeds']}"
            key = (shape, r["dtype"], r["mode"], r["pass"])
            rows.setdefault(key, []).append((r["time_us"], r["pct_floor"]))
    return rows


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("builds", nargs="+", help="NAME=FILE[,FILE...]")
    ap.add_argument("--shapes", help="only these shapes (RxH/S, comma separated)")
    ap.add_argument("--pass", dest="op", choices=["forward", "forward+backward"], help="only this pass")
    args = ap.parse_args(argv)
    builds = []
    for b in args.builds:
        name, sep, files = b.partition("=")
        if not sep or not files:
            ap.error(f"want NAME=FILE[,FILE...], got {b!r}")
        try:
            builds.append((name, load(files.split(","))))
        except (OSError, ValueError, KeyError) as e:
            ap.error(f"{name}: cannot read its bench_cuda JSON: {e}")
    shapes = set(args.shapes.split(",")) if args.shapes else None
    keys = [k for k in builds[0][1] if all(k in rows for _, rows in builds[1:])]
    if shapes:
        keys = [k for k in keys if k[0] in shapes]
    if args.op:
        keys = [k for k in keys if k[3] == args.op]
    if not keys:
        print("no rows common to every build", file=sys.stderr)
        return 1
    head = ["shape", "dtype", "seeds", "pass"] + [f"{n} us (% of copy)" for n, _ in builds]
    head += [f"{builds[0][0]} / {n}" for n, _ in builds[1:]]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for k in keys:
        cells = list(k)
        base = builds[0][1][k]
        for _, rows in builds:
            t = [x for x, _ in rows[k]]
            p = [y for _, y in rows[k]]
            cells.append(f"{min(t):.1f}-{max(t):.1f} ({min(p):.1f}-{max(p):.1f} %)")
        for _, rows in builds[1:]:
            t = [x for x, _ in rows[k]]
            b = [x for x, _ in base]
            lo, hi = min(b) / max(t), max(b) / min(t)
            mark = "*" if hi < 0.98 or lo > 1.02 else ""
            cells.append(f"{lo:.2f}-{hi:.2f}x{mark}")
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
