#!/usr/bin/env python3
"""Per-row rate and fixed cost per launch, from bench_cuda JSON.

bench_cuda times each pass at each shape against the same run's copy of the
same bytes. Run it at several row counts of one hidden size and seed count,
e.g.

    bench_cuda --no-candidates --runs 30 --json d.json \\
        --shapes 7680x768:16,8192x768:16,9216x768:16,16384x768:16
    python3 scripts/fixed_cost.py d.json

and this fits time = rows * rate + fixed (least squares) for every (pass,
dtype, hidden, seeds, seed mode) with two or more row counts, for the kernel
and for the copy (the copy's time is time * % floor / 100: the floor moves
the same bytes), and prints both as "us per 8192 rows + us per launch"
(docs/PERFORMANCE.md, tenth session).
"""
import argparse
import collections
import json
import sys


def fit(points):
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return slope, my - slope * mx


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", help="bench_cuda --json files (rows of one file set each point)")
    ap.add_argument("--pass", dest="passes", default="forward,forward+backward",
                    help="comma-separated passes to fit (default: forward,forward+backward)")
    args = ap.parse_args(argv)
    wanted = set(args.passes.split(","))
    groups = collections.defaultdict(lambda: collections.defaultdict(list))
    for path in args.json:
        with open(path) as f:
            for r in json.load(f)["rows"]:
                if r.get("candidate") or r["pass"] not in wanted or r["pct_floor"] <= 0:
                    continue
                key = (r["pass"], r["dtype"], r["hidden"], r["seeds"], r["mode"])
                copy_us = r["time_us"] * r["pct_floor"] / 100.0
                groups[key][r["rows"]].append((r["time_us"], copy_us))
    printed = False
    print(f"{'pass':17} {'dtype':9} {'H/S':9} {'seeds':12} {'rows':24} "
          f"{'kernel: us/8192 rows + us':>27} {'copy: us/8192 rows + us':>25}")
    for key in sorted(groups):
        by_rows = groups[key]
        if len(by_rows) < 2:
            continue
        # The median of repeated points (several files) per row count.
        pts, cps = [], []
        for rows in sorted(by_rows):
            ts = sorted(t for t, _ in by_rows[rows])
            cs = sorted(c for _, c in by_rows[rows])
            pts.append((rows, ts[len(ts) // 2]))
            cps.append((rows, cs[len(cs) // 2]))
        ks, ki = fit(pts)
        cs_, ci = fit(cps)
        rows = ",".join(str(r) for r, _ in pts)
        print(f"{key[0]:17} {key[1]:9} {str(key[2]) + '/' + str(key[3]):9} {key[4]:12} {rows:24} "
              f"{ks * 8192:14.1f} + {ki:8.1f} {cs_ * 8192:14.1f} + {ci:6.1f}")
        printed = True
    if not printed:
        print("no (pass, dtype, H, S, mode) with two or more row counts", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
