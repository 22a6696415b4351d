#!/usr/bin/env python3
"""Summarise `bench_cuda --timeline` output (a -DKASMINA_TIMELINE build,
src/cuda/timeline.cuh, docs/DESIGN.md 56): where a forward's (TMA kernel)
and a backward's (generic kernel) time goes.

For each (op, dtype, shape, seed mode, repeat): the launch's span from the
first CTA's entry to the last CTA's end, the spread of the CTAs' entries,
each phase's duration across the CTAs (median, 90th percentile, maximum),
when the row loops end, the seeds' last CTAs (and the backward's rows'
last seeds), the loop ends by the number of CTAs their SM held, the CTA's
reduction by its order on its SM (the first pays the code's fetch), and
the set-up and loop ends by seed kind (the bench cycles RESIDUAL,
ATTENTION, MLP, CONV over the seeds).

    python3 scripts/timeline_summary.py timeline.txt [--rep N]

Phases (globaltimer ns), forward: entry -> ring ready -> seed set up ->
first pass landed -> row loop done -> CTA reduced -> ticket taken -> end.
Backward: entry -> seed set up -> row loop done -> CTA partials written ->
ticket taken -> seed finished -> row ticket -> end. A 12-slot build also
splits the forward's set-up and last merge and the backward's seed finish
and a blueprint row's last seed (DETAILS below).
"""
import argparse
import collections
import statistics
import sys

PHASES = {
    "fwd": ["ring", "setup", "first pass", "row loop", "CTA reduce", "ticket", "end/merge"],
    "bwd": ["setup", "row loop", "CTA partials", "ticket", "seed finish", "row ticket", "end/row sums"],
}
LOOP_END = {"fwd": 4, "bwd": 2}
# Detail marks (slots 8-11 of a 12-slot build, src/cuda/timeline.cuh): chains
# of slots inside a phase, each step printed as its median over the CTAs
# that recorded every slot of the chain.
DETAILS = {
    "fwd": [("set-up", [1, 8, 2], ["view (+softmax)", "table"]),
            ("last CTA's merge", [6, 9, 10, 11, 7], ["start", "partials loaded", "CTA merge", "telemetry row"])],
    "bwd": [("seed finish", [4, 8, 9, 10, 5], ["partials loaded", "CTA merge", "dW columns", "seed's rows out"]),
            ("a row's last seed", [6, 11, 7], ["ordered sums, clears", "end"])],
}
KINDS = ["RESIDUAL", "ATTENTION", "MLP", "CONV"]


def quantile(values, q):
    v = sorted(values)
    return v[min(len(v) - 1, int(q * (len(v) - 1) + 0.5))]


def parse(lines):
    runs = collections.defaultdict(list)
    for line in lines:
        if not line.startswith("TL "):
            continue
        f = line.split()
        key = (f[1], f[2], f[3], f[4], int(f[5]))
        cta, seed, tile, smid, last, last_seed, passes = map(int, f[7:14])
        slots = (len(f) - 14 + 1) // 2  # K globaltimer values, then K - 1 cycle counts
        runs[key].append({
            "event_us": float(f[6]), "cta": cta, "seed": seed, "tile": tile, "smid": smid,
            "last": last == 1, "last_seed": last_seed == 1, "passes": passes,
            "g": [int(v) for v in f[14:14 + slots]], "c": [int(v) for v in f[14 + slots:14 + 2 * slots - 1]],
        })
    return runs


def us(ns):
    return ns / 1000.0


def summarise(key, ctas, out):
    op, dtype, shape, mode, rep = key
    span = max(r["g"][7] for r in ctas)
    out.write(f"== {op} {dtype} {shape} {mode} repeat {rep}: {len(ctas)} CTAs, events {ctas[0]['event_us']:.1f} us, "
              f"span {us(span):.2f} us (first entry to last end)\n")
    entries = [r["g"][0] for r in ctas]
    out.write(f"   entries      {us(min(entries)):6.2f} .. {us(max(entries)):6.2f} us (median {us(statistics.median(entries)):.2f})\n")
    for k, name in enumerate(PHASES[op], start=1):
        d = [r["g"][k] - r["g"][k - 1] for r in ctas if r["g"][k] >= 0 and r["g"][k - 1] >= 0]
        if d:
            out.write(f"   {name:12s} median {us(statistics.median(d)):6.2f}  p90 {us(quantile(d, 0.9)):6.2f}  "
                      f"max {us(max(d)):6.2f} us\n")
    le = LOOP_END[op]
    loop_end = [r["g"][le] for r in ctas if r["g"][le] >= 0]
    out.write(f"   row loops end {us(min(loop_end)):6.2f} .. {us(max(loop_end)):6.2f} us "
              f"(median {us(statistics.median(loop_end)):.2f})\n")
    # By how many of this launch's CTAs their SM held: an SM with one more
    # CTA than another streams each of its CTAs' rows more slowly.
    per_sm = collections.Counter(r["smid"] for r in ctas)
    by_load = collections.defaultdict(list)
    for r in ctas:
        if r["g"][le] >= 0:
            by_load[per_sm[r["smid"]]].append(r["g"][le])
    if len(by_load) > 1:
        parts = [f"{k} per SM: {len(v)} CTAs, median {us(statistics.median(v)):.2f} max {us(max(v)):.2f}"
                 for k, v in sorted(by_load.items())]
        out.write("   row loops end by CTAs on their SM: " + "; ".join(parts) + " us\n")
    # The CTA's reduction by its order among its SM's CTAs reaching it: the
    # first on an SM fetches the code from L2/DRAM (the bench flushes L2),
    # the later ones find it in the SM's instruction cache (DESIGN 59).
    red_start = LOOP_END[op]
    by_order = collections.defaultdict(list)
    on_sm = collections.defaultdict(list)
    for r in ctas:
        if r["g"][red_start] >= 0 and r["g"][red_start + 1] >= 0:
            on_sm[r["smid"]].append(r)
    for rs in on_sm.values():
        rs.sort(key=lambda r: r["g"][red_start])
        for i, r in enumerate(rs):
            by_order[i + 1].append(r["g"][red_start + 1] - r["g"][red_start])
    if by_order:
        parts = [f"{k}{'st' if k == 1 else 'nd' if k == 2 else 'rd' if k == 3 else 'th'} "
                 f"{us(statistics.median(v)):.2f} ({len(v)})" for k, v in sorted(by_order.items())]
        out.write(f"   {PHASES[op][red_start]} by order on the SM, medians us (CTAs): " + ", ".join(parts) + "\n")
    lasts = [r for r in ctas if r["last"]]
    if lasts:
        merge = [r["g"][7] - r["g"][6] for r in lasts]
        out.write(f"   seeds' last CTAs: from the ticket to the end median {us(statistics.median(merge)):.2f} "
                  f"max {us(max(merge)):.2f} us, last end {us(max(r['g'][7] for r in lasts)):.2f} us\n")
    for r in ctas:
        if r["last_seed"]:
            out.write(f"   a row's last seed (seed {r['seed']}): row ticket at {us(r['g'][6]):.2f} us, "
                      f"its row of dweights/dscales {us(r['g'][7] - r['g'][6]):.2f} us, "
                      f"end {us(r['g'][7]):.2f} us\n")
    for name, chain, steps in DETAILS[op]:
        if max(chain) >= len(ctas[0]["g"]):
            continue
        rec = [r for r in ctas if all(r["g"][k] >= 0 for k in chain)]
        if not rec:
            continue
        parts = []
        for (a, b), step in zip(zip(chain, chain[1:]), steps):
            parts.append(f"{step} {us(statistics.median(r['g'][b] - r['g'][a] for r in rec)):.2f}")
        out.write(f"   {name} ({len(rec)} CTAs, medians, us): " + ", ".join(parts) + "\n")
    by_kind = collections.defaultdict(list)
    for r in ctas:
        by_kind[r["seed"] % 4].append(r)
    for k in sorted(by_kind):
        v = by_kind[k]
        a, b = (1, 2) if op == "fwd" else (0, 1)
        setup = statistics.median(r["g"][b] - r["g"][a] for r in v)
        out.write(f"   {KINDS[k] if mode != 'dormant' else 'dormant':9s} setup {us(setup):5.2f} us, row loops end median "
                  f"{us(statistics.median(r['g'][le] for r in v)):6.2f} max {us(max(r['g'][le] for r in v)):6.2f} us\n")


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--rep", type=int, default=None, help="only this repeat (0-2)")
    args = ap.parse_args(argv)
    with open(args.file) as f:
        runs = parse(f)
    if not runs:
        print("no TL lines (was bench_cuda built with -DKASMINA_TIMELINE and run with --timeline?)", file=sys.stderr)
        return 1
    for key in sorted(runs):
        if args.rep is None or key[4] == args.rep:
            summarise(key, runs[key], sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
