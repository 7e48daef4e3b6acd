#!/usr/bin/env bash
# One command for a GPU machine: the kernel tests compiled for the GPU (no interpreter), then every
# kernel benchmark; JSON and a markdown table land in benchmarks/results/ with the date and device.
#   bash benchmarks/gpu.sh            (from the repository root, with the project installed)
set -uo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=0
unset MINBERT_KERNEL_BACKEND
PY=${PY:-python}
day=$(date +%F)
device=$($PY -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-') if torch.cuda.is_available() else 'cpu')")
out=benchmarks/results/gpu-$day-$device
mkdir -p "$out"
status=0

echo "== kernel tests on $device (compiled, no interpreter)"
$PY -m pytest -q tests/kernels -p no:cacheprovider 2>&1 | tee "$out/tests.txt" || status=1

for bench in attention lora smart_kernels smart; do
  [ -f "benchmarks/test_$bench.py" ] || continue
  echo "== benchmark $bench"
  $PY -m pytest -q "benchmarks/test_$bench.py" --benchmark-only -s -p no:cacheprovider \
      --benchmark-json="$out/$bench.json" 2>&1 | tee "$out/$bench.txt" || status=1
done

$PY benchmarks/to_markdown.py "$out"/*.json --title "GPU kernels, $day, $device" > "$out/RESULTS.md"
echo "== wrote $out/RESULTS.md"
exit $status
