"""Plot benchmark rows: TFLOP/s against S, one panel per (variant, D, mode), one line per impl.
B3 rows (a training step has no FLOP count) plot ms per step and peak memory per implementation,
one group of bars per S, from one or more files (rows of the same device and dtype); an
implementation that ran out of memory is marked "OOM".

    python benchmarks/plot.py benchmarks/results/h100_<date>/B2_h100_<commit>.csv   # writes the .png beside it
    python benchmarks/plot.py A.csv B.csv --out docs/assets/B3_h100_<commit>.png    # B3 from several runs
"""

import csv
import sys
from collections import defaultdict

COLORS = {"flexebt": "tab:blue", "torch_flex_compiled": "tab:orange", "sdpa_causal": "tab:gray",
          "ebt_flash_attention": "tab:red", "eager_math": "tab:green", "flexebt_piecewise": "tab:blue",
          "flexebt_causal": "tab:gray", "sdpa_2x_causal": "tab:gray", "sdpa_2x_causal_flash": "tab:purple",
          "sdpa_2x_causal_cudnn": "tab:brown", "torch_flex_concat_compiled": "tab:orange"}


B3_ORDER = ("eager_math", "compiled_math", "compiled_math_ro", "flexebt", "flexebt_cudagraph", "flexebt_compiled",
            "flexebt_compiled_ro", "floor_compiled")
B3_COLORS = {"eager_math": "#7fbf7f", "compiled_math": "#2ca02c", "compiled_math_ro": "#145214",
             "flexebt": "#9ecae1", "flexebt_cudagraph": "#6baed6", "flexebt_compiled": "#2171b5",
             "flexebt_compiled_ro": "#08306b", "floor_compiled": "#bdbdbd"}


def plot_b3(rows, out):
    """Two panels: ms per step and peak GiB, bars per implementation grouped by S (y from zero)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seqs = sorted({int(r["S"]) for r in rows})
    impls = [i for i in B3_ORDER if any(r["impl"] == i for r in rows)]
    cell = {}
    for r in rows:  # a row measured in several files: the first file's
        cell.setdefault((r["impl"], int(r["S"])), r)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.4))
    width = 0.8 / len(impls)
    for ax, field, label in ((axes[0], "ms", "ms per training step"), (axes[1], "peak_mem_gib", "peak GiB above the model")):
        top = max(float(r[field]) for r in rows if r[field] not in ("", "nan"))
        for j, impl in enumerate(impls):
            for i, S in enumerate(seqs):
                r = cell.get((impl, S))
                if r is None:
                    continue
                x = i + (j - (len(impls) - 1) / 2) * width
                if r[field] in ("", "nan"):
                    ax.text(x, 0.02 * top, "OOM" if "memory" in r.get("note", "") else "n/a", rotation=90,
                            ha="center", va="bottom", fontsize=7)
                    continue
                ax.bar(x, float(r[field]), width, color=B3_COLORS.get(impl), label=impl if i == 0 or
                       (impl, seqs[0]) not in cell else None)
                ax.text(x, float(r[field]), f"{float(r[field]):.0f}", ha="center", va="bottom", fontsize=6)
        ax.set_xticks(range(len(seqs)), [f"S={S}\nB={cell[next(k for k in cell if k[1] == S)]['B']}" for S in seqs])
        ax.set_ylim(0, top * 1.12)
        ax.set_ylabel(label)
        ax.set_xlabel("sequence length (4096 tokens per batch)")
    handles, labels = axes[0].get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    axes[0].legend(seen.values(), seen.keys(), fontsize=7, ncol=2)
    r0 = rows[0]
    fig.suptitle(f"B3: EBT training step ({r0['variant']}, {r0['dtype']}) on {r0['device']}, torch {r0['torch']}, "
                 f"commit {', '.join(sorted({r['commit'] for r in rows}))}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(out)


def main(path, *more, out=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for p in (path, *more) for r in csv.DictReader(open(p))]
    if rows and rows[0]["suite"] == "B3":
        return plot_b3(rows, out or path.rsplit(".", 1)[0] + ".png")
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
        ax.set_ylim(bottom=0)  # from zero: ratios read off the bars' heights
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
    out = out or path.rsplit(".", 1)[0] + ".png"
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", nargs="+", help="result files (B3: several runs of one device and dtype)")
    ap.add_argument("--out", help="the PNG to write (default: beside the first file)")
    a = ap.parse_args()
    main(*a.csv, out=a.out)
