#!/usr/bin/env bash
# The GPU-side checks in one call: the memory checker over the memcheck workload and the
# edge-case workload (memcheck_edge_workload.py, small sizes), the out-of-range workload (must
# end in a device-side assertion), and the GPU test suite, one pytest process per test file in
# parallel.  Logs go to $OUT (default: ./gpu_checks_out).
#
#     OUT=/tmp/checks bash benchmarks/gpu_checks.sh
#
# PYTORCH_NO_CUDA_MEMORY_CACHING=1 gives every tensor its own allocation, so the memory
# checker sees an access past a buffer's end even where the caching allocator would have put
# another live block there.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_checks_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET

(
  start=$(date +%s)
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 97 \
    python benchmarks/memcheck_workload.py > "$OUT/memcheck.log" 2>&1
  echo "exit $? after $(( $(date +%s) - start )) s" >> "$OUT/memcheck.log"
) &

(
  start=$(date +%s)
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 97 \
    python benchmarks/memcheck_edge_workload.py --small > "$OUT/memcheck_edge.log" 2>&1
  echo "exit $? after $(( $(date +%s) - start )) s" >> "$OUT/memcheck_edge.log"
) &

(
  python benchmarks/memcheck_workload.py --oob > "$OUT/oob.log" 2>&1
  echo "exit $?" >> "$OUT/oob.log"
) &

for f in $(grep -l "pytest.mark.gpu" tests/test_*.py); do
  name=$(basename "$f" .py)
  (
    start=$(date +%s)
    python -m pytest -m gpu -q -p no:cacheprovider "$f" > "$OUT/pytest_$name.log" 2>&1
    echo "exit $? after $(( $(date +%s) - start )) s" >> "$OUT/pytest_$name.log"
  ) &
done
wait

for log in "$OUT"/*.log; do
  echo "== $(basename "$log"): $(tail -n 2 "$log" | tr '\n' ' ')"
done
