#!/usr/bin/env bash
# The GPU measurements still owed (issue 12), as one script for a lent GPU session. Stages run in order of
# importance, each bounded by what is left of DEADLINE seconds; every stage's output lands in /tmp/gpu_results,
# tarred to $OUT/results.tgz after each stage (the device returns at most 8 files, so one archive; a timed-out
# run still returns what it finished), with $OUT/stages.txt listing each stage's exit status and time.
#
# Before: bash ../shared/perf/prepare_device.sh   (fills the git-ignored .gpu/ with wheels and gpu_run.sh)
# Run (device tool, carry [".gpu"]):   DEADLINE=540 bash .gpu/gpu_run.sh bash scripts/gpu_checks.sh
#
# 1. pytest -m gpu: every kernel against the dense reference on CUDA (includes Triton autotuning).
# 2. bench_kernels at 768/32768/32/8192 under bf16 autocast: gathered rows in float32 vs bf16
#    (SAELAB_SPARSE_ROWS), to choose that default by measurement.
# 3. bench_vs_peers, all three libraries with peak memory (the issue's memory target), default rows.
# 4. bench_train at 768: TopK, BatchTopK (not re-measured since its candidate selection), ReLU, MP.
# 5. bench_vs_peers, saelab alone with SAELAB_SPARSE_ROWS=autocast (same data and script as stage 3).
# 6. profile_step.py of the new step at 768 (AuxK idle and active).
set -uo pipefail
: "${OUT:?set OUT to the folder whose files come back}"
DEADLINE=${DEADLINE:-540}
start=$(date +%s)
res=/tmp/gpu_results
rm -rf "$res" && mkdir -p "$res"

left() { echo $((DEADLINE - ($(date +%s) - start))); }

stage() {  # stage NAME SECONDS command...: run with at most min(SECONDS, time left - 10 s)
    local name=$1 budget=$2
    shift 2
    local limit
    limit=$(left)
    limit=$((limit - 10 < budget ? limit - 10 : budget))
    if [ "$limit" -lt 20 ]; then
        echo "skip $name: ${limit}s left" | tee -a "$res/stages.txt"
        return
    fi
    echo "== $name (limit ${limit}s)" | tee -a "$res/stages.txt"
    timeout "$limit" "$@" > "$res/$name.txt" 2>&1
    echo "   rc=$? after $(($(date +%s) - start))s" | tee -a "$res/stages.txt"
    tail -25 "$res/$name.txt"
    tar -czf "$OUT/results.tgz" -C "$(dirname "$res")" "$(basename "$res")"
    cp "$res/stages.txt" "$OUT/stages.txt"
}

stage gpu_tests 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests
stage kernels_rows 60 python3 scripts/bench_kernels.py --device cuda --d-in 768 --n 32768 --k 32 --batch 8192 \
    --autocast --rounds 5 --json "$res/kernels_rows.json"
stage vs_peers 180 python3 scripts/bench_vs_peers.py --device cuda --steps 300 --json "$res/vs_peers.json"
stage variants 60 python3 scripts/bench_train.py --device cuda --d-in 768 --n 32768 --k 32 --batch 8192 \
    --runs topk batchtopk relu mp --steps 60 --rounds 3 --no-memory --json "$res/variants.json"
stage vs_peers_rows_bf16 90 env SAELAB_SPARSE_ROWS=autocast python3 scripts/bench_vs_peers.py --device cuda \
    --steps 300 --libs saelab --no-memory --json "$res/vs_peers_rows_bf16.json"
stage profile 60 python3 .gpu/profile_step.py "$res" 768,32768,32,8192
# hydra/launcher=together: stacked vs looped same-shape TopK SAEs on a GPU (sets stacked.AUTO_STACK_BYTES["cuda"])
stage together 120 python3 scripts/bench_together.py --parts synthetic --device cuda --saes 8 --d-in 768 \
    --n 16384 --k 32 --batch 4096 --steps 30 --repeats 2 --json "$res/together.json"
echo "done after $(($(date +%s) - start))s"
