#!/usr/bin/env bash
# one device call: GPU checks then B3 rows. usage: bash .gpu_call.sh COMMIT SEQS IMPLS DTYPES CHECKS(0/1) B3_TIMEOUT
set -u
C=$1; SEQS=$2; IMPLS=$3; DT=$4; CHECKS=$5; T=${6:-400}
export PYTHONPATH=$PWD/.gpu_deps:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
if [ "$CHECKS" = 1 ]; then
  start=$(date +%s)
  OUT=$OUT/checks timeout 280 bash benchmarks/gpu_checks.sh
  echo "checks took $(( $(date +%s) - start )) s"
fi
if [ -n "$IMPLS" ]; then
  timeout $T python benchmarks/bench.py --suite B3 --b3-dtypes $DT --seqs $SEQS --b3-layers 12 \
    --b3-impls $IMPLS --commit $C --out $OUT/B3 2>&1 | grep -v "^W1\|Warning" | tail -40
fi
