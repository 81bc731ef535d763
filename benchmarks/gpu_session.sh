#!/usr/bin/env bash
# Everything a session with a GPU should run, in under 10 minutes (the steps' time limits add up to 590 s), from the
# repository root:
#     bash benchmarks/gpu_session.sh              # on a CUDA GPU; results in $OUT (default benchmarks/results/gpu)
#     bash benchmarks/gpu_session.sh --dry-run    # the same steps on CPU (TRITON_INTERPRET=1, small sizes; CI)
# What it measures, in order (session.log lists each step, its time limit and exit status):
#   1. device.txt      the GPU, its compute capability, torch/triton versions
#   2. tests_1, tests_2  the kernel parity, dispatch and safety tests on the GPU, twice (a flaky tolerance shows)
#   3. memcheck        compute-sanitizer --tool memcheck over every kernel at blocksizes 16/256/2048/8192 on small
#                      odd sizes and partial row blocks (skipped, and logged so, where compute-sanitizer is absent)
#   4. parity.csv      4096x11008, 5 steps: fraction of 8-bit codes that differ from the reference, largest code
#                      step, absmax equality, largest parameter difference (fp32; bf16 with and without stochastic
#                      rounding)
#   5. kernels_gpu.csv kernel GB/s as a % of device copy bandwidth, and whole-step times against torch fused
#                      AdamW, torch SGD foreach and bitsandbytes AdamW8bit (benchmarks/kernels_gpu.py)
#   6. profile.txt     one torch.profiler pass over the 8-bit SGD-SaI kernel next to a copy of the same tensor
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
DRY=""
if [ "${1:-}" = "--dry-run" ]; then
    DRY="--dry-run"
    export TRITON_INTERPRET=1
    OUT=${OUT%/}_dryrun
fi
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
LOG="$OUT/session.log"
: > "$LOG"
status=0
step() {  # step NAME SECONDS COMMAND...: runs it under a time limit, output in $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: rc=$rc in $((SECONDS - start)) s (limit $limit s): $*" | tee -a "$LOG"
    [ $rc -eq 0 ] || status=1
}
python - > "$OUT/device.txt" 2>&1 <<'PY'
import torch, triton
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
else:
    print("no CUDA device (dry run on CPU)")
print("torch", torch.__version__, "triton", triton.__version__)
PY
TESTS=(tests/test_kernels_quantize.py tests/test_kernels_sgdsai.py tests/test_kernels_adamw.py tests/test_triton_dispatch.py
       tests/test_finite_flags.py)
if [ -n "$DRY" ]; then
    step tests_1 120 python -m pytest -q -x -p no:cacheprovider "${TESTS[@]}" -k "257 or 300 or launches_go"
else
    step tests_1 110 python -m pytest -q -p no:cacheprovider "${TESTS[@]}"
    step tests_2 110 python -m pytest -q -p no:cacheprovider "${TESTS[@]}"
fi
if command -v compute-sanitizer > /dev/null && [ -z "$DRY" ]; then
    step memcheck 90 compute-sanitizer --tool memcheck --error-exitcode 9 python benchmarks/gpu_checks.py memcheck
else
    step memcheck 90 python benchmarks/gpu_checks.py memcheck $DRY
    echo "memcheck: compute-sanitizer not run ($([ -n "$DRY" ] && echo dry run || echo not installed)): the workload ran without it" | tee -a "$LOG"
fi
step parity 60 python benchmarks/gpu_checks.py parity --out "$OUT" $DRY
step bench 180 python benchmarks/kernels_gpu.py --out "$OUT/kernels_gpu" $DRY
step profile 40 python benchmarks/gpu_checks.py profile --out "$OUT" $DRY
echo "done: status $status" | tee -a "$LOG"
exit $status
