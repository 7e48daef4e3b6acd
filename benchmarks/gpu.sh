#!/usr/bin/env bash
# One command for a GPU machine: the kernel tests compiled for the GPU (no interpreter), every kernel
# benchmark and the SMART training-step benchmark (host wall clock), then each kernel's device time
# with the block-size sweeps (benchmarks/gpu_profile.py); logs, JSON and a markdown table land in
# benchmarks/results/gpu-<date>-<device>/.
#   bash benchmarks/gpu.sh                 (from the repository root, with the project installed)
#   STAGES="attention lora" bash benchmarks/gpu.sh     (a subset; "tests" is a stage too)
# Each stage runs under its own time limit (STAGE_TIMEOUT seconds, default 300) so that one slow
# or hung stage cannot eat a whole lease; the script exits non-zero if any stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
unset MINBERT_KERNEL_BACKEND
PY=${PY:-python}
STAGES=${STAGES:-"tests attention lora smart_kernels smart profile"}
STAGE_TIMEOUT=${STAGE_TIMEOUT:-300}
day=$(date +%F)
device=$($PY -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-') if torch.cuda.is_available() else 'cpu')")
out=benchmarks/results/gpu-$day-$device
mkdir -p "$out"
status=0

{
  date -u +"%F %T UTC"
  $PY -c "import torch, triton; p = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None; \
print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda); \
print(p.name, p.multi_processor_count, 'SMs', round(p.total_memory / 2**30, 1), 'GiB') if p else print('no CUDA')"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>/dev/null || true
} | tee "$out/env.txt"

# pytest-xdist spreads the tests' Triton compilations over the CPU cores when it is installed.
xdist=()
$PY -c "import xdist" 2>/dev/null && xdist=(-n "${TEST_WORKERS:-8}")

for stage in $STAGES; do
  if [ "$stage" = tests ]; then
    echo "== kernel tests on $device (compiled, no interpreter)"
    timeout "$STAGE_TIMEOUT" $PY -m pytest -q -rfE tests/kernels -p no:cacheprovider "${xdist[@]}" \
        2>&1 | tee "$out/tests.txt" || status=1
    continue
  fi
  if [ "$stage" = profile ]; then
    echo "== device time per kernel call (torch.profiler), with block-size sweeps"
    timeout "$STAGE_TIMEOUT" $PY benchmarks/gpu_profile.py --sweep --out "$out/profile.json" \
        2>&1 | tee "$out/profile.txt" || status=1
    continue
  fi
  [ -f "benchmarks/test_$stage.py" ] || { echo "no benchmarks/test_$stage.py"; status=1; continue; }
  echo "== benchmark $stage"
  timeout "$STAGE_TIMEOUT" $PY -m pytest -q "benchmarks/test_$stage.py" --benchmark-only -s -p no:cacheprovider \
      --benchmark-json="$out/$stage.json" 2>&1 | tee "$out/$stage.txt" || status=1
done

bench_json=$(ls "$out"/*.json 2>/dev/null | grep -v '/profile')  # pytest-benchmark files only
if [ -n "$bench_json" ]; then
  $PY benchmarks/to_markdown.py $bench_json --title "GPU benchmarks, $day, $device" > "$out/RESULTS.md"
  echo "== wrote $out/RESULTS.md"
fi
exit $status
