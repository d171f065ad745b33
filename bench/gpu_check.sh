#!/usr/bin/env bash
# One-shot check on a machine with an NVIDIA GPU, under 8 minutes:
#
#   bench/gpu_check.sh OUT          # the test suite on CUDA, then the benchmarks
#   bench/gpu_check.sh OUT --cpu    # a tiny version on the CPU (tests/test_gpu_check.py)
#
# 1. tests: EVOTORCH_MQA_MOE_TEST_DEVICE=cuda pytest. First every test that takes the
#    `device` fixture or is marked `cuda` (they run on the GPU), then the rest of the
#    suite (CPU-side code; `slow` tests left out) under a time cap of
#    GPU_CHECK_SUITE_SECONDS (default 200), so the whole check stays under 8 minutes.
# 2. benchmarks (bench/gpu_check.py): forward (dense P=64, low-rank P=1024), operators,
#    evaluate and bf16 accuracy, float32 and bfloat16, config A and the seed preset.
#
# Writes OUT/gpu_check.json, OUT/gpu_check.md and the pytest logs; prints the table.
# Exit status: 0 when every test passed and no benchmark failed, 1 otherwise.
set -uo pipefail

out=${1:?usage: bench/gpu_check.sh OUT_FOLDER [--cpu]}
mode=${2:-}
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
[ -x "$python" ] || python=python3
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$root"

if [ "$mode" = "--cpu" ]; then
    device=cpu; tiny=--tiny; threads="--threads 2"
    device_tests=(tests/test_lowrank.py -k "equals_dense_pass and mqa")
    rest_tests=(tests/test_config.py)
    cap=120
else
    device=cuda; tiny=; threads=
    device_tests=(tests -m "device or cuda")
    rest_tests=(tests -m "not device and not cuda and not slow")
    cap=${GPU_CHECK_SUITE_SECONDS:-200}
    nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
fi
export EVOTORCH_MQA_MOE_TEST_DEVICE=$device
start=$(date +%s)

echo "== tests on $device (device-aware)"
"$python" -m pytest -q -p no:cacheprovider "${device_tests[@]}" > "$out/tests-device.log" 2>&1
device_rc=$?
tail -n 1 "$out/tests-device.log"

echo "== tests: the rest of the suite (cap ${cap}s)"
timeout "$cap" "$python" -m pytest -q -p no:cacheprovider "${rest_tests[@]}" \
    > "$out/tests-rest.log" 2>&1
rest_rc=$?
[ $rest_rc -eq 124 ] && echo "(stopped at the ${cap}s cap)" >> "$out/tests-rest.log"
tail -n 1 "$out/tests-rest.log"

echo "== benchmarks on $device"
"$python" bench/gpu_check.py "$out" --device "$device" $tiny $threads \
    --tests-log "device-aware=$out/tests-device.log" --tests-log "rest=$out/tests-rest.log" \
    > "$out/bench.log" 2>&1
bench_rc=$?
cat "$out/gpu_check.md" 2>/dev/null || tail -n 30 "$out/bench.log"
echo "== done in $(( $(date +%s) - start )) s: tests rc $device_rc / $rest_rc, bench rc $bench_rc"

# bench_rc is 1 when a benchmark failed (recorded in the report), other when the script died
if [ $device_rc -ne 0 ] || { [ $rest_rc -ne 0 ] && [ $rest_rc -ne 124 ]; } \
        || [ $bench_rc -ne 0 ]; then
    exit 1
fi
exit 0
