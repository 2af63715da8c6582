"""Write ``benchmarks/results/README.md``: the index of the result files, one table per folder.

    python benchmarks/tools/index_results.py            # rewrite the index
    python benchmarks/tools/index_results.py --check    # exit 1 if the index is stale or a file misplaced
    python benchmarks/tools/index_results.py --where out/B2_h100_d64_<commit>.csv   # its folder

Result files live in ``benchmarks/results/<device>_<YYYY-MM-DD>/``: the device (h100 / h200 /
cpu) from the rows' ``device`` field or the file name, the date from the rows' ``timestamp`` field
where they carry one, else the day the file was first committed. A run folder (the logs of one
``gpu_checks.sh`` call) is one entry. ``invalid/`` keeps runs that must not be cited.

CSV / JSON rows (written by ``bench.py``) describe themselves: suite, variants, dtypes and head
dims, lengths, modes, implementations, commit. Text logs are described in ``NOTES`` below; a new
log without an entry there is described by its first line. ``CURRENT`` names the runs the
Benchmarks page quotes as the current numbers: keep it in step with that page.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import pathlib
import re
import sys

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "results"
INDEX = RESULTS / "README.md"
DEVICES = ("h100", "h200", "cpu")
FOLDER = re.compile(r"^(h100|h200|cpu)_(\d{4}-\d{2}-\d{2})$")
INVALID = "invalid"

# The runs the current numbers of docs/benchmarks.md come from (by file stem or run folder).
CURRENT = {
    "B1_h100_2accba0", "B1_h100_bf16_s4096_2accba0",
    "B2_h100_d64_5d5846c", "B2_h100_d64_large_1486128", "B2_h100_d128_5d5846c", "B2_h100_d64_d128_all_5d5846c",
    "B3_h100_bf16_s256_ro_7f5672b", "B3_h100_bf16_s256_compiled_7f5672b", "B3_h100_bf16_s2048_7f5672b",
    "B3_h100_bf16_s1024_s4096_7f5672b", "B3_h100_fp32_s256_eager_7b38585", "B3_h100_fp32_s256_compiled_7b38585",
    "B3_h100_fp32_s256_ro_b493a3c", "B3_h100_bf16_s256_ro_7dc45a6", "B3_h100_bf16_s256_compiled_7dc45a6",
    "B4_h200_71970fc", "B4_h100_d128_daf5d74",
    "gpu_checks_h100_1b5cb43", "B3_h100_bf16_s1024_compiled_1b5cb43", "B3_h100_fp32_s256_ro_1b5cb43",
    "B3_h100_bf16_s4096_ro_1b5cb43", "B3_h100_bf16_s2048_ro_1b5cb43", "B3_h100_fp32_s1024_ro_1b5cb43",
    "B3_h100_fp32_s2048_82595dd", "B3_h100_fp32_s4096_82595dd", "gpu_checks_h100_82595dd",
    "ab_B2_softcap_tanh_e538fc0_82595dd", "gpu_checks_h100_488b947", "ab_B2_msum_a81250c_488b947",
    "ab_B2_softcap_tanh_e538fc0_488b947", "profile_bwd_causal_h100_a81250c_488b947",
    "gpu_checks_h100_0dba7e1", "ab_B2_a81250c_0dba7e1", "bias_grad_paths_h100_0dba7e1",
    "options_ab_b43963d", "dqatomic_tma_24893cd", "bbar_rows_8e11ad4", "gpu_checks_h100_7ef590b",
}

# Why a run is not to be cited, per file in invalid/.
INVALID_WHY = {
    "B2_d64_a2ab411_recompile_limit": "torch's baseline reused one compiled function across shapes and fell back "
                                      "to eager after dynamo's recompile limit (15-95 ms per call)",
}

# What a text log measured: stem -> (tool, what). Row files need no entry (their rows say it);
# an entry for one adds a note.
NOTES = {
    # CPU
    "ebt_codegen_cpu_181c3f5": ("timing script", "tracing and code generation of a new EBT call (S512, captured "
                                "bias): one kernel module for both streams"),
    "same_numbers_cpu_7b38585_3a3c26a": ("same_numbers.py", "the kernel engine rebuilt from per-family template "
                                        "files against the commit before: every result bit-identical"),
    "overhead_cpu_7b38585_a3eec18": ("overhead.py", "flexebt's Python per call, launches stubbed: the engine before and "
                                "after the per-family templates and declared signatures"),
    "same_numbers_cpu_b4ea005_f02d396": ("same_numbers.py", "argument groups, the own key's template file and one "
                                         "DOT constexpr against the commit before: every result bit-identical"),
    "same_numbers_cpu_fcf12fd_13ea89e": ("same_numbers.py", "the two-stream dk/dv kernel removed, against the "
                                         "commit before: every result bit-identical"),
    "overhead_bind_cpu_b4ea005_7380fa9": ("overhead.py --bind", "flexebt's Python per call with each launch's "
                                          "argument binding, before and after the argument groups"),
    "overhead_cpu_0ca08bc": ("overhead.py", "flexebt's Python time per call, launches stubbed"),
    "overhead_bind_cpu_d2f2895_c1d9086": ("overhead.py --bind", "flexebt's Python per call with one EBT node, "
                                          "and with one node per stream"),
    "overhead_cpu_74851fc": ("overhead.py", "flexebt's Python time per call, launches stubbed: before and after "
                             "precomputed Function signatures and cached tile configs"),
    "cpu_host_measurements_c6c71ae": ("timing scripts", "import time of torch and flexebt, the example trainer's "
                                      "rate, where the compile time goes"),
    # H100
    "ab_B2_msum_a81250c_488b947": ("ab_commits.py", "B2 causal / soft-cap / ALiBi / learned bias, bf16 S4096 D64: "
                                   "one lse per row against each row's max and sum (its README.md)"),
    "ab_B2_a81250c_0dba7e1": ("ab_commits.py", "B2 causal / soft-cap / ALiBi / learned bias, bf16 S4096 D64 / D128: "
                              "one lse per row against the row references in two planes (its README.md)"),
    "ab_B2_softcap_tanh_e538fc0_488b947": ("ab_commits.py", "B2 soft-cap, bf16 S4096 D64 / D128: the tanh of "
                                           "e538fc0 against the leaner accurate tanh (its README.md)"),
    "bias_grad_paths_h100_0dba7e1": ("bias_grad_paths.py (first version, from a scratch copy: its header's commit "
                                     "is the device copy's stale git metadata; the tree was 0dba7e1)",
                                     "learned bias [16, S, S] fwd+bwd: atomic adds against read-add-write "
                                     "(one accumulator, or one per batch element) under deterministic algorithms"),
    "profile_bwd_causal_h100_a81250c_488b947": ("torch.profiler (scratch script)", "causal fwd+bwd, bf16 S4096 D64: "
                                                "time per kernel, one lse per row against max and sum"),
    "ab_B2_softcap_tanh_e538fc0_82595dd": ("ab_commits.py", "B2 soft-cap and causal, bf16 S4096 D64 / D128: the "
                                           "kernels' tanh as one exp form against exp form plus Taylor "
                                           "polynomial (its README.md)"),
    "ab_dq_atomic_h100_75118db": ("profile_ebt.py / tune.py --ab", "dq by atomic adds in the dk/dv pass against "
                                  "the dq pass: EBT bf16 D64 S4096; causal D64 / D128 S4096 backward"),
    "ab_heads_fast_h100_1f2acff": ("profile_ebt.py / tune.py --ab", "heads on the fast grid axis against the plain "
                                   "order: EBT S2048-8192; causal D64 / D128"),
    "ab_partial_loop_stages_h100_bc66136": ("scratch A/B", "pipeline depth of the partial-block loops: EBT bf16 "
                                            "D64 S4096; causal D64 / D128 S4096"),
    "api_vs_launcher_h100_a57fd51": ("api_vs_launcher.py", "causal bf16 D64 S4096 forward, B 2/4/8: public call, "
                                     "launcher, torch; host time per call (after the block-table cache)"),
    "api_vs_launcher_h100_c454172": ("api_vs_launcher.py", "causal bf16 D64 S4096 forward, B 2/4/8: public call, "
                                     "launcher, torch; host time per call (before the block-table cache)"),
    "ebt_ab_defaults_h100_224ce16": ("profile_ebt.py --sweep", "EBT bf16 D64 S4096: old against new D64 tiles"),
    "ebt_ab_tma_dbwd_h100_8938ef0": ("profile_ebt.py --ab", "EBT bf16 D64 S4096 with the double backward: TMA "
                                     "loads on against off"),
    "ebt_ab_tma_profile_h100_c454172": ("profile_ebt.py --ab", "EBT bf16 D64 S4096: TMA loads off against on, "
                                        "per-kernel profile"),
    "ebt_default_vs_plain_h100_ba517fc": ("profile_ebt.py --sweep", "EBT bf16 D64 S4096: default head groups "
                                          "against the plain order"),
    "ebt_floor_ab_h100_3b07fca": ("profile_ebt.py --floor --ab", "EBT bf16 D64 S4096: 2 x SDPA per backend; "
                                  "raw-max forward off / on; TMA in the backward"),
    "ebt_floor_h100_a57fd51": ("profile_ebt.py --floor", "EBT bf16 D64 S4096 against 2 x SDPA per backend"),
    "ebt_fwd_sweep_h100_224ce16": ("profile_ebt.py --sweep", "EBT bf16 D64 S4096: forward tiles"),
    "ebt_profile_tma_h100_3b07fca": ("profile_ebt.py", "EBT bf16 D64 S4096: per-kernel profile with TMA loads"),
    "ebt_sweep_h100_8bcea66": ("profile_ebt.py --sweep", "EBT bf16 D64 S4096: dq and dk/dv tiles"),
    "gpu_tests_dbwd_ebt_h100_8938ef0": ("pytest -m gpu", "GPU tests of the double backward and EBT, TMA in the "
                                        "double backward"),
    "grid_order_h100_1e35d4c": ("grid_order.py", "head groups against the plain order (first rule)"),
    "grid_order_h100_da49e8a": ("grid_order.py", "head groups against the plain order (one wave, narrow group "
                                "first)"),
    "grid_order_h100_ba517fc": ("grid_order.py", "head groups against the plain order (final rule: the largest "
                                "divisor of the heads)"),
    "small_s_h100_2accba0": ("small_s.py", "causal D64 S1024 B16: host against kernel time of a fwd+bwd, host "
                             "cost per launch"),
    "small_s_h100_2accba0_run1": ("small_s.py", "S 1k-4k and D128 ALiBi S1024 (the script's first version)"),
    "small_s_h100_ea23126": ("small_s.py", "S 1k / 2k with the first re-launch path (opt-in), torch alongside"),
    "small_s_h100_a775d76": ("small_s.py", "S 1k / 2k with launch plans, torch alongside, cProfile"),
    "sweep_fwd_group_h100_da49e8a": ("profile_ebt.py --sweep", "EBT bf16 D64 S4096: forward head-group sizes"),
    "sweep_head_group_h100_e697654": ("profile_ebt.py --sweep", "EBT bf16 D64 S4096 / 8192: head-group sizes per "
                                      "pass"),
    "sweep_head_group2_h100_e697654": ("tune.py --ab", "causal D64 / D128 at S 1k / 4k / 16k: head-group sizes per "
                                       "pass, torch alongside"),
    "tune_ab_tma_defaults_h100_c454172": ("tune.py --ab", "causal D64 / D128 S4096: TMA loads off / on at the new "
                                          "default tiles"),
    "tune_ab_tma_h100_3b07fca": ("tune.py --ab", "causal D64 / D128 S4096: TMA loads off / on"),
    "tune_bwd_tma_h100_3b07fca": ("tune.py", "causal D64 / D128 S4096: backward tiles with TMA loads"),
    "tune_d128_bwd_h100_5aabe51": ("tune.py", "causal D128 S 1k-8k: backward tiles per pass; TMA A/B"),
    "tune_d128_bwd_old_defaults_h100_71d0160": ("tune.py", "causal D128 S4096 / 8192: the old backward tiles "
                                                "timed again"),
    "tune_d128_s1024_h100_a775d76": ("tune.py", "causal D128 S1024: backward tiles"),
    "tune_dbwd_h100_ebt_s4096_75118db": ("tune_second_order.py", "EBT bf16 D64 S4096: double-backward tiles"),
    "tune_dq_atomic_h100_75118db": ("tune.py", "causal D64 / D128 S4096: dk/dv tiles with dq by atomics"),
    "tune_fwd_d64_h100_224ce16": ("tune.py", "causal D64 S4096: forward tiles"),
    "tune_fwd_tma_d64_h100_3b07fca": ("tune.py", "causal D64 S4096: forward tiles with TMA loads"),
    "profile_ebt_step_h100_s256_58528d4": ("profile_ebt_step.py", "where one eager EBT training step's time goes "
                                           "(12 layers, bf16 S256 B16)"),
    "profile_ebt_step_h100_fp32_l4_d2f2895": ("profile_ebt_step.py", "the eager EBT step, fp32 S256 B16, 4 layers: "
                                              "flexebt against eager math, kernels by GPU time"),
    "profile_ebt_step_h100_bf16_l4_d2f2895": ("profile_ebt_step.py", "the eager EBT step, bf16 S256 B16, 4 layers: "
                                              "flexebt against eager math, kernels by GPU time"),
    "profile_ebt_step_h100_fp32_l4_compiled_d2f2895": ("profile_ebt_step.py", "the compiled EBT step, fp32 S256 B16, "
                                                       "4 layers: floor, flexebt and math in reduce-overhead mode"),
    "profile_ebt_step_h100_fp32_l4_7db08c9": ("profile_ebt_step.py", "the EBT step, fp32 S256 B16, 4 layers, with "
                                              "one autograd node per EBT stream (summary lines of the run)"),
    "small_s_h100_7b38585_d2f2895": ("small_s.py", "causal D64 S1024 B16, two alternating rounds of the commit "
                                     "before and after the argument groups: kernel and host time of a fwd+bwd"),
    "launch_cost_h100_d2f2895": ("launch_cost.py", "host time of one launch with flat against grouped arguments"),
    "host_split_h100_ca98eb6": ("host_split.py", "host against GPU time of one eager call: flex B2 shapes and EBT "
                                "B1 shapes, S1024 / 2048, fwd / fwd+bwd / double backward"),
    # H200
    "host_split_h200_ebt_d128_s1024_7b38585": ("host_split.py", "EBT bf16 D128 S1024 fwd+bwd and double backward, "
                                               "kernel and host time: the engine before its rebuild (one call with "
                                               "the d2f2895 row)"),
    "host_split_h200_ebt_d128_s1024_d2f2895": ("host_split.py", "the same rows after the engine rebuild (same call "
                                               "as the 7b38585 row)"),
    "host_profile_h200_ebt_s1024_d64_d73c5ef": ("host_profile.py", "host time per eager EBT step (bf16 B8 H8 S1024 "
                                                "D64) and its cProfile: fwd, fwd+bwd, second order"),
    "ab_reverse_h200_5be9c1a": ("tune.py --ab", "causal D64 S4096: heavy-first query order off / on"),
    "ebt_ab_merged_dkdv_h200_75507d2": ("profile_ebt.py", "EBT bf16 D64 S4096: dk/dv in two launches against one "
                                        "over both query streams"),
    "fp32_products_a6fe4e0": ("fp32_products.py", "fp32 IEEE against tf32x3 products: error against float64, "
                              "time"),
    "gpu_tests_piecewise_71970fc": ("pytest -m gpu", "GPU tests of piecewise attention"),
    "tune_ab_one_launch_6342662": ("tune.py --ab", "causal D64 / D128 S4096: the backward in one launch against "
                                   "two"),
    "tune_ab_reverse_8d1b7ac": ("tune.py --ab", "causal S4096: heavy-first query order off / on, after the loop "
                                "unroll"),
    "tune_ab_tma_f4bd59d": ("tune.py --ab", "causal D64 / D128 S4096: TMA loads in the forward off / on"),
    "tune_dbwd_fp32_d32_s512": ("tune_second_order.py", "fp32 tf32x3, D32 S512 B16 H12: double-backward tiles"),
    "tune_dbwd_fp32_tf32x3_d64_d128_s1024": ("tune_second_order.py", "fp32 tf32x3, D64 / D128 S1024: "
                                             "double-backward tiles"),
    "tune_dbwd_h200_ebt_s4096": ("tune_second_order.py", "EBT bf16 D64 S4096: double-backward tiles"),
    "tune_h200_ad7c3d9": ("tune.py", "causal D64 / D128 S4096: tiles per pass"),
    "tune_h200_e744b6f": ("tune.py", "causal D64 / D128 S4096: tiles per pass"),
    "tune_h200_d128_bwd_329d366": ("tune.py", "causal D128 S4096: backward tiles"),
    # row files: a note beside what the rows say
    "B1_h100_2accba0": (None, "the D128 rows at S >= 4096 from a second call minutes later"),
    "B1_h100_bf16_s4096_2accba0": (None, "a second process, D64 twice after D128"),
    "B1_h200_bf16_d64_532990d_plan_cache": (None, "after the EBT plan cache"),
    "B2_h100_d64_d128_all_5d5846c": (None, "the current B2 files in one, and the plot"),
    "B2_h100_d64_small_a775d76_run2": (None, "a second run of the same commit"),
    "AB_B1_h100_7b38585_d2f2895_d128_old_r1": (None, "cut short by its call's time limit (no S16384 double-backward "
                                               "row)"),
    "cprofile_ebt_step_h100_bf16_l4_compiled_7dc45a6": ("profile_ebt_step.py --python-profile (the same cProfile "
                                                        "in a script of its own)", "host Python of five compiled "
                                                        "steps, default mode, 4 layers: where the host time goes"),
    "B3_h100_bf16_s2048_ro_1b5cb43": (None, "a second call after the first was cut off by its time limit (inductor's "
                                      "caches warm: first step 22.9 s)"),
    "B3_h100_bf16_s256_compiled_7dc45a6_r2": (None, "a second call on the same warm machine (inductor's caches warm: "
                                              "first step 26.7 s); 7b38585, run before it in the same call, did not compile this step"),
    "AB_B1_h100_7b38585_d2f2895_d128_ab": (None, "from all six rounds; new r1, old r2 and new r2 ran in two later "
                                           "calls on the same warm machine, in that order"),
}

# The tool behind a text log without a NOTES entry, by name prefix (first match), and what such a
# log holds (None: its first line says).
TOOLS = [
    ("tune_dbwd", "tune_second_order.py", None), ("tune", "tune.py", None),
    ("sweep", "profile_ebt.py / tune.py", None), ("profile_ebt_step", "profile_ebt_step.py", None),
    ("ebt", "profile_ebt.py", None), ("grid_order", "grid_order.py", None), ("small_s", "small_s.py", None),
    ("api_vs_launcher", "api_vs_launcher.py", None),
    ("table_conversion", "table_conversion.py", "host cost of converting a block mask's tables, two commits in "
                                                "alternating rounds"),
    ("host_split", "host_split.py", None), ("overhead", "overhead.py", None),
    ("fp32_products", "fp32_products.py", None), ("first_call", "first_call.py", None),
    ("gpu_tests", "pytest -m gpu", "the GPU tests' log"),
    ("gpu_checks", "gpu_checks.sh", "memcheck over the workload, the out-of-range assert, the GPU tests (its "
                                    "README.md says what ran)"),
    ("notebooks", "notebooks", "the example notebooks run on the GPU"), ("ab", "A/B", None),
]
DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}
ROW_SUFFIXES = (".csv", ".json")


def _rows(files: list[pathlib.Path]) -> list[dict]:
    """The rows of a run: its CSV, else its JSON (a list of row objects)."""
    for f in sorted(files, key=lambda p: p.suffix != ".csv"):
        if f.suffix == ".csv":
            with f.open(newline="") as fh:
                return list(csv.DictReader(fh))
        if f.suffix == ".json":
            data = json.loads(f.read_text())
            if isinstance(data, list) and all(isinstance(r, dict) for r in data):
                return data
    return []


def _device_of(name: str, rows: list[dict]) -> str | None:
    found = set()
    for r in rows:
        d = str(r.get("device", "")).upper()
        found |= {k for k in DEVICES if k.upper() in d}
        if d and not any(k.upper() in d for k in DEVICES) and "CPU" in d:
            found.add("cpu")
    m = re.search(r"(?:^|_)(h100|h200|cpu)(?:_|$)", name.lower())
    if m:
        found.add(m.group(1))
    return found.pop() if len(found) == 1 else None


def _date_of(rows: list[dict]) -> str | None:
    stamps = {str(r.get("timestamp", ""))[:10] for r in rows if r.get("timestamp")}
    return min(stamps) if stamps else None


def _commit_of(stem: str, rows: list[dict]) -> str:
    commits = sorted({str(r["commit"]) for r in rows if r.get("commit")})
    if commits:
        return ", ".join(commits)
    tokens = [t for t in stem.split("_") if re.fullmatch(r"[0-9a-f]{7,40}", t)]
    return tokens[-1] if tokens else "--"


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _span(values: list[int]) -> str:
    values = sorted(set(values))
    if len(values) == 1:
        return f"S{values[0]}"
    if len(values) <= 3:
        return "S " + " / ".join(str(v) for v in values)
    return f"S {values[0]}-{values[-1]}"


def _describe_rows(rows: list[dict]) -> tuple[str, str]:
    suites = sorted({str(r.get("suite", "")) for r in rows} - {""})
    variants = sorted({str(r.get("variant", "")) for r in rows} - {""})
    dims = sorted({(DTYPES.get(str(r.get("dtype")), str(r.get("dtype"))), int(r["D"])) for r in rows if r.get("D")},
                  key=lambda x: (x[0] != "bf16", x[1]))
    seqs = [int(r["S"]) for r in rows if r.get("S")]
    modes = sorted({str(r.get("mode", "")) for r in rows} - {""}, key=len)
    impls = sorted({str(r.get("impl", "")) for r in rows} - {""})
    shapes = sorted({(int(r["B"]), int(r["H"])) for r in rows if r.get("B") and r.get("H")})
    parts = [", ".join(variants), ", ".join(f"{d} D{n}" for d, n in dims)]
    if seqs:
        tokens = {int(r["B"]) * int(r["S"]) for r in rows if r.get("B") and r.get("S")}
        heads = {h for _, h in shapes}
        if len(shapes) == 1:
            parts.append(f"B{shapes[0][0]} H{shapes[0][1]} " + _span(seqs))
        elif len(tokens) == 1 and len(heads) == 1:
            parts.append(f"B*S = {tokens.pop()} H{heads.pop()}, " + _span(seqs))
        else:
            parts.append(_span(seqs))
    parts.append(", ".join(modes))
    parts.append("impls: " + ", ".join(f"`{i}`" for i in impls))
    parts.append(_count(len(rows), "row"))
    return ", ".join(suites), "; ".join(p for p in parts if p)


def _first_line(path: pathlib.Path) -> str:
    if path.is_dir():
        path = path / "README.md"
        if not path.exists():
            return "run folder"
    try:
        for line in path.read_text(errors="replace").splitlines():
            line = line.strip().lstrip("#=").strip()
            if line and not set(line) <= set(".[]%0123456789 "):
                return line if len(line) <= 110 else line[:107] + "..."
    except OSError:
        pass
    return ""


def _tool_of(stem: str) -> tuple[str, str | None]:
    for prefix, tool, what in TOOLS:
        if stem == prefix or stem.startswith(prefix + "_"):
            return tool, what
    return "--", None


class Entry:
    """One run: the files of one stem in a folder, or one run folder."""

    def __init__(self, folder: pathlib.Path, stem: str, files: list[pathlib.Path], is_dir: bool = False):
        self.folder, self.stem, self.files, self.is_dir = folder, stem, sorted(files), is_dir
        self.rows = [] if is_dir else _rows([f for f in self.files if f.suffix in ROW_SUFFIXES])

    def links(self, with_folder: bool = False) -> str:
        names = [f.relative_to(RESULTS).as_posix() for f in self.files]
        label = f"{self.folder.name}/{self.stem}" if with_folder else self.stem
        if self.is_dir:
            inner = ", ".join(f"[{pathlib.PurePosixPath(n).name}]({n})" for n in names)
            return f"`{label}/`: {inner}"
        kinds = ", ".join(f"[{pathlib.PurePosixPath(n).suffix.lstrip('.') or 'file'}]({n})" for n in names)
        return f"`{label}` {kinds}"

    def suite_and_what(self) -> tuple[str, str]:
        tool, note = NOTES.get(self.stem, (None, None))
        if self.rows:
            suite, what = _describe_rows(self.rows)
            return f"{suite} (bench.py)", f"{what}. {note[0].upper() + note[1:]}" if note else what
        if all(f.suffix == ".png" for f in self.files):
            return "plot", "plot.py output"
        default_tool, default_what = _tool_of(self.stem)
        if note:
            return tool or default_tool, note
        return default_tool, default_what or _first_line(self.folder / self.stem if self.is_dir else self.files[0])

    def status(self) -> str:
        if self.folder.name == INVALID:
            return "**INVALID, do not cite**: " + INVALID_WHY.get(self.stem, "see the note in this folder")
        return "**current**" if self.stem in CURRENT else "history"

    def row(self, with_folder: bool = False) -> str:
        suite, what = self.suite_and_what()
        cells = [self.links(with_folder), suite, what, _commit_of(self.stem, self.rows), self.status()]
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def entries(folder: pathlib.Path) -> list[Entry]:
    by_stem: dict[str, list[pathlib.Path]] = {}
    runs = []
    for p in sorted(folder.iterdir()):
        if p.is_dir():
            runs.append(Entry(folder, p.name, [f for f in p.rglob("*") if f.is_file()], is_dir=True))
        elif p.is_file():
            by_stem.setdefault(p.name[: -len(p.suffix)] if p.suffix else p.name, []).append(p)
    return sorted([Entry(folder, s, fs) for s, fs in by_stem.items()] + runs, key=lambda e: e.stem)


def folders() -> list[pathlib.Path]:
    """Dated folders newest first (h100, h200, cpu within a day), then invalid/."""
    dated = [p for p in RESULTS.iterdir() if p.is_dir() and FOLDER.match(p.name)]
    dated.sort(key=lambda p: (FOLDER.match(p.name)[2], -DEVICES.index(FOLDER.match(p.name)[1])), reverse=True)
    return dated + ([RESULTS / INVALID] if (RESULTS / INVALID).is_dir() else [])


def result_files() -> list[pathlib.Path]:
    """Every file under results/ but the index itself."""
    return sorted(p for p in RESULTS.rglob("*") if p.is_file() and p != INDEX)


def misplaced() -> list[str]:
    """Files outside a <device>_<date> folder (or invalid/), or whose rows name another device or day."""
    bad = []
    for p in result_files():
        top = p.relative_to(RESULTS).parts[0]
        if top == INVALID:
            continue
        m = FOLDER.match(top)
        if not m or p.parent == RESULTS:
            bad.append(f"{p.relative_to(RESULTS)}: not in a <device>_<YYYY-MM-DD> folder")
            continue
        rows = _rows([p]) if p.suffix in ROW_SUFFIXES else []
        device = _device_of(p.name, rows)
        if device and device != m[1]:
            bad.append(f"{p.relative_to(RESULTS)}: device {device}, folder {top}")
        date = _date_of(rows)
        if date and date != m[2]:
            bad.append(f"{p.relative_to(RESULTS)}: rows dated {date}, folder {top}")
    return bad


def where(path: pathlib.Path) -> str:
    """The folder a new result file belongs in (dated today when its rows carry no timestamp)."""
    rows = _rows([path]) if path.suffix in ROW_SUFFIXES else []
    device = _device_of(path.name, rows)
    if device is None:
        raise SystemExit(f"{path}: no device in its rows or its name; name it *_h100_*, *_h200_* or *_cpu_*")
    date = _date_of(rows) or datetime.date.today().isoformat()
    return (RESULTS / f"{device}_{date}").relative_to(RESULTS.parents[1]).as_posix() + "/"


HEADER = """\
# Benchmark results

<!-- Written by benchmarks/tools/index_results.py; run it after adding or moving a result file. -->

One folder per device and day: `<device>_<YYYY-MM-DD>/`, the device (h100, h200, cpu) from the
rows' `device` field or the file name, the day from the rows' `timestamp` field where they carry
one, else the day the file was first committed. `invalid/` keeps runs that must not be cited.

File names say `<suite or tool>_<device>_<what>_<commit>`. Rows of `bench.py` (CSV, the same rows
in JSON, a PNG from `plot.py`) carry the device, torch and triton versions and the commit; the
schema is in [`../README.md`](../README.md). Status: **current** -- a run the Benchmarks page
(`docs/benchmarks.md`) quotes as the current numbers of its suite (for the GPU checks: the latest
run); history -- an earlier run, kept for the record (the page's history, the design records and
comments in the code cite many of them); **INVALID** -- not to be cited.

A new run: `python benchmarks/tools/index_results.py --where <file>` names its folder; move the
files there, add a line to `NOTES` in that script for a text log, then run the script.
"""


def render() -> str:
    out = [HEADER]
    current = [e for f in folders() for e in entries(f) if e.stem in CURRENT]
    out.append("## Current reference runs\n")
    out.append("| file | suite / tool | what it measured | commit | status |")
    out.append("|---|---|---|---|---|")
    out += [e.row(with_folder=True) for e in sorted(current, key=lambda e: e.stem)]
    out.append("")
    for folder in folders():
        es = entries(folder)
        n = sum(len(e.files) for e in es)
        title = f"`{folder.name}/`"
        if folder.name == INVALID:
            title += " -- runs not to cite"
        else:
            dev, day = FOLDER.match(folder.name).groups()
            title += f" -- {dev.upper() if dev != 'cpu' else 'CPU'}, {day}"
        out.append(f"## {title}\n")
        out.append(f"{_count(len(es), 'run')}, {_count(n, 'file')}.\n")
        out.append("| file | suite / tool | what it measured | commit | status |")
        out.append("|---|---|---|---|---|")
        out += [e.row() for e in es]
        out.append("")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if README.md is stale or a file is misplaced")
    p.add_argument("--where", type=pathlib.Path, help="print the folder a new result file belongs in")
    args = p.parse_args()
    if args.where:
        print(where(args.where))
        return 0
    bad = misplaced()
    for line in bad:
        print("misplaced:", line, file=sys.stderr)
    text = render()
    if args.check:
        stale = not INDEX.exists() or INDEX.read_text() != text
        if stale:
            print(f"{INDEX} is not current: run python benchmarks/tools/index_results.py", file=sys.stderr)
        return 1 if stale or bad else 0
    INDEX.write_text(text)
    print(f"wrote {INDEX} ({len(result_files())} files)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
