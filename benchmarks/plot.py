"""Plot benchmark rows: TFLOP/s against S, one panel per (variant, D, mode), one line per impl.
B3 rows (a training step has no FLOP count) plot ms per step and peak memory instead.

    python benchmarks/plot.py benchmarks/results/h100_<date>/B2_h100_<commit>.csv   # writes the .png beside it
"""

import csv
import sys
from collections import defaultdict

COLORS = {"flexebt": "tab:blue", "torch_flex_compiled": "tab:orange", "sdpa_causal": "tab:gray",
          "ebt_flash_attention": "tab:red", "eager_math": "tab:green", "flexebt_piecewise": "tab:blue",
          "flexebt_causal": "tab:gray", "sdpa_2x_causal": "tab:gray", "sdpa_2x_causal_flash": "tab:purple",
          "sdpa_2x_causal_cudnn": "tab:brown", "torch_flex_concat_compiled": "tab:orange"}


def main(path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(open(path)))
    if rows and rows[0]["suite"] == "B3":  # one panel per (dtype, quantity)
        rows = [dict(r, variant=f"{r['variant']} {r['dtype']}", mode=m, tflops=r[field])
                for r in rows for m, field in (("ms/step", "ms"), ("peak GiB", "peak_mem_gib"))]
    panels = sorted({(r["variant"], r["D"], r["mode"]) for r in rows})
    cols = 4
    fig, axes = plt.subplots(-(-len(panels) // cols), cols, figsize=(4 * cols, 3.2 * -(-len(panels) // cols)),
                             squeeze=False)
    for ax, key in zip(axes.flat, panels):
        lines = defaultdict(list)
        for r in rows:
            if (r["variant"], r["D"], r["mode"]) == key and r["tflops"] not in ("", "nan"):
                lines[r["impl"]].append((int(r["S"]), float(r["tflops"])))
        for impl, pts in sorted(lines.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl, color=COLORS.get(impl))
        ax.set_xscale("log", base=2)
        ax.set_title(f"{key[0]} D{key[1]} {key[2]}", fontsize=9)
        ax.set_xlabel("S")
        ax.set_ylabel(key[2] if key[2] in ("ms/step", "peak GiB") else "TFLOP/s")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    dev = rows[0]["device"] if rows else ""
    fig.suptitle(f"{rows[0]['suite'] if rows else ''} on {dev} (torch {rows[0]['torch'] if rows else ''}, "
                 f"commit {rows[0]['commit'] if rows else ''})", fontsize=10)
    fig.tight_layout()
    out = path.rsplit(".", 1)[0] + ".png"
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main(sys.argv[1])
