"""Two commits side by side on one machine: the same bench.py rows for an older checkout's flexebt
and this one's, in alternating rounds (old, new, old, new, ...), then one table of the best time of
each row per commit and their ratio.  A change meant to keep the speed passes when no row of the
new commit is slower than the old by more than ``--tolerance`` (default 2 %).

    git archive <old commit> | tar -x -C /tmp/old
    python benchmarks/tools/ab_commits.py --old /tmp/old --old-commit <old commit> --out results/AB \\
        -- --suite B2 --dims 64,128 --seqs 1024,4096,16384 --modes fwd,fwd+bwd --impls flexebt

Everything after ``--`` goes to bench.py (its ``--out`` and ``--commit`` are set here).  The old
checkout's flexebt is imported through FLEXEBT_IMPORT_ROOT, with this checkout's harness; ``--new`` names
a second checkout to measure in place of this one (two older commits compared with today's harness).  Writes
``PREFIX_<label>_r<round>.csv`` per run and ``PREFIX_ab.csv`` with the comparison; exits 1 when a
row is slower than the tolerance allows.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import subprocess
import sys

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench.py")
KEY = ("suite", "impl", "variant", "dtype", "B", "H", "S", "D", "mode")


def _git_head() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=os.path.dirname(BENCH))
    return out.stdout.strip() or "unknown"


def best_times(rows: list[dict]) -> dict:
    """The smallest finite ``ms`` of each row key over the given rows (several rounds of one commit)."""
    best: dict = {}
    for r in rows:
        try:
            ms = float(r["ms"])
        except (KeyError, ValueError):
            continue
        if not math.isfinite(ms):
            continue
        k = tuple(r[c] for c in KEY)
        best[k] = min(ms, best.get(k, math.inf))
    return best


def compare(old_rows: list[dict], new_rows: list[dict], tolerance: float = 0.02) -> list[dict]:
    """One entry per row key measured for both commits: the best ms of each, new / old, and whether
    the new commit is slower than ``tolerance`` allows."""
    old, new = best_times(old_rows), best_times(new_rows)
    out = []
    for k in sorted(set(old) & set(new)):
        ratio = new[k] / old[k]
        out.append({**dict(zip(KEY, k)), "old_ms": old[k], "new_ms": new[k], "ratio": round(ratio, 4),
                    "slower": ratio > 1 + tolerance})
    return out


def _read(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    bench_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", required=True, help="a checkout (or copy) of the older commit: its flexebt is measured")
    p.add_argument("--old-commit", required=True, help="the older commit's name, recorded in its rows")
    p.add_argument("--new", default="", help="a checkout (or copy) of the newer commit (default: this one)")
    p.add_argument("--new-commit", default=None, help="the newer commit's name (default: this checkout's git HEAD)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per commit (each a bench.py run)")
    p.add_argument("--tolerance", type=float, default=0.02, help="allowed slowdown of a row, as a fraction")
    p.add_argument("--out", required=True, help="path prefix of the result files")
    a = p.parse_args(own)
    labels = {"old": (a.old_commit, os.path.abspath(a.old)), "new": (a.new_commit or _git_head(), a.new and os.path.abspath(a.new))}
    rows = {"old": [], "new": []}
    for r in range(a.rounds):
        for label, (commit, root) in labels.items():
            out = f"{a.out}_{label}_r{r}"
            env = dict(os.environ, FLEXEBT_IMPORT_ROOT=root)
            subprocess.run([sys.executable, BENCH, *bench_args, "--commit", commit, "--out", out], env=env, check=True)
            rows[label] += _read(out + ".csv")
    table = compare(rows["old"], rows["new"], a.tolerance)
    with open(f"{a.out}_ab.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*KEY, "old_ms", "new_ms", "ratio", "slower"])
        w.writeheader()
        w.writerows(table)
    for t in table:
        flag = "  SLOWER" if t["slower"] else ""
        print(f"{t['suite']} {t['impl']:10s} {t['variant']:12s} {t['dtype']:9s} S{t['S']:>6s} D{t['D']:>4s} "
              f"{t['mode']:14s} {t['old_ms']:9.4f} -> {t['new_ms']:9.4f} ms  x{t['ratio']:.3f}{flag}")
    slower = sum(t["slower"] for t in table)
    print(f"{len(table)} rows, {slower} slower than {a.old_commit} by more than {a.tolerance:.0%}")
    return 1 if slower else 0


if __name__ == "__main__":
    sys.exit(main())
