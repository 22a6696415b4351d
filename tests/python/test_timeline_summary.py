"""scripts/timeline_summary.py on a synthetic timeline whose phases are known
(the real records come from a -DKASMINA_TIMELINE build on a GPU, DESIGN 56)."""

import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "timeline_summary.py"
SLOTS = 12


def record(cta, seed, tile, smid, last, g):
    """One `TL` line of a forward: 12 globaltimer values (ns; -1 = not
    passed), then 11 clock64 offsets (here 2 cycles per ns)."""
    cycles = [2 * (v - g[0]) if v >= 0 else -1 for v in g[1:]]
    head = ["TL", "fwd", "float32", "64x64x2", "blend", "0", "12.5", cta, seed, tile, smid,
            int(last), 0, 3]
    return " ".join(str(v) for v in head + g + cycles)


def synthetic():
    # 2 seeds x 2 tiles, two CTAs on each of SMs 0 and 1. Slots: 0 entry,
    # 1 ring, 2 set-up, 3 first pass, 4 loop done, 5 reduced, 6 ticket,
    # 7 end, 8 view loaded, 9-11 the last CTA's merge (DESIGN 56, 59).
    lines = []
    for cta in range(4):
        seed, tile, smid = cta // 2, cta % 2, cta % 2
        first_on_sm = cta < 2  # CTAs 0 and 1 reach their reduction first on SMs 0 and 1
        loop_done = 10_000 + 100 * cta
        reduced = loop_done + (2_000 if first_on_sm else 1_000)
        ticket = reduced + 500
        last = tile == 1
        g = [0, 1_000, 3_000, 3_500, loop_done, reduced, ticket, -1, 2_500, -1, -1, -1]
        if last:
            g[9], g[10], g[11] = ticket + 100, ticket + 400, ticket + 900
            g[7] = ticket + 1_200
        else:
            g[7] = ticket + 50
        lines.append(record(cta, seed, tile, smid, last, g))
    return "\n".join(lines) + "\n"


def run(tmp_path, text):
    f = tmp_path / "tl.txt"
    f.write_text(text)
    return subprocess.run([sys.executable, str(SCRIPT), str(f)], capture_output=True, text=True)


def test_summary_of_known_phases(tmp_path):
    p = run(tmp_path, synthetic())
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "== fwd float32 64x64x2 blend repeat 0: 4 CTAs" in out
    # The last to end is CTA 1: first on SM 1 and its seed's last CTA,
    # 10100 + 2000 + 500 + 1200 ns.
    assert "span 13.80 us" in out
    assert "row loops end  10.00 ..  10.30 us" in out
    # First on its SM: 2 us; second: 1 us (two of each).
    assert "CTA reduce by order on the SM, medians us (CTAs): 1st 2.00 (2), 2nd 1.00 (2)" in out
    # The seeds' last CTAs: ticket to end 1.2 us; their merge's steps.
    assert "from the ticket to the end median 1.20 max 1.20 us, last end 13.80 us" in out
    assert "start 0.10, partials loaded 0.30, CTA merge 0.50, telemetry row 0.30" in out


def test_no_records_is_an_error(tmp_path):
    p = run(tmp_path, "bench_cuda output without TL lines\n")
    assert p.returncode == 1
    assert "no TL lines" in p.stderr
