"""Host cost of converting a block mask's tables for the kernels (CPU): the first call with a new
(or edited) block mask converts its tables once (``flexebt.blockmask.tables_in_range``; later calls
reuse the conversion).  Prints, per mask shape, the host synchronisations one conversion makes and
its best time over rounds.  Run it for two checkouts with FLEXEBT_IMPORT_ROOT to compare commits.

    python benchmarks/tools/table_conversion.py
    FLEXEBT_IMPORT_ROOT=/path/to/old/checkout python benchmarks/tools/table_conversion.py
"""

import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # benchmarks/
import bench  # noqa: E402,F401  (puts FLEXEBT_IMPORT_ROOT, or the repository, first on the path)
import flexebt  # noqa: E402
from flexebt.blockmask import tables_in_range  # noqa: E402
from torch.nn.attention.flex_attention import create_block_mask  # noqa: E402


def documents(b, h, q_idx, kv_idx):
    """Causal attention within documents of 1000 tokens: partial and full blocks, empty ones."""
    return (q_idx >= kv_idx) & (q_idx // 1000 == kv_idx // 1000)


def _syncs(fn) -> int:
    """How many times ``fn`` reads a tensor's value on the host (bool(), item(), torch.equal)."""
    count = [0]
    saved = torch.Tensor.__bool__, torch.Tensor.item, torch.equal

    def counted(f):
        def g(*a):
            count[0] += 1
            return f(*a)
        return g

    torch.Tensor.__bool__, torch.Tensor.item, torch.equal = (counted(f) for f in saved)
    try:
        fn()
    finally:
        torch.Tensor.__bool__, torch.Tensor.item, torch.equal = saved
    return count[0]


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(flexebt.__file__)))
    commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "-C", root, "status", "--short", "--untracked-files=no", "flexebt"],
                           capture_output=True, text=True).stdout.strip()
    print(f"# table conversion, CPU, torch {torch.__version__}, flexebt at {commit}{' + changes' if dirty else ''}")
    for B, H, S in ((1, 1, 4096), (2, 4, 4096), (4, 8, 8192)):
        bm = create_block_mask(documents, B, H, S, S, device="cpu", BLOCK_SIZE=128)
        syncs = _syncs(lambda: tables_in_range(bm, S, S))
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(10):
                tables_in_range(bm, S, S)
            best = min(best, (time.perf_counter() - t) / 10)
        print(f"B{B} H{H} S{S}: {syncs} host syncs, {best * 1e3:.2f} ms per conversion (best of 5 rounds of 10)")


if __name__ == "__main__":
    main()
