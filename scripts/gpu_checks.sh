#!/usr/bin/env bash
# The checks only a GPU machine can make, in one call (device time is scarce): the gpu-marked tests
# (kernel accuracy against fp32, the Llama training with kernels), then the kernel benchmark.
# Results land in benchmarks/results/kernels_<device>/ (and $OUT/ when set, for the device tool).
set -uo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check here')" || exit 1
device=$(python -c "import re, torch; print(re.sub('[^a-z0-9]+', '_', torch.cuda.get_device_name().lower()).strip('_'))")
out=benchmarks/results/kernels_${device}
mkdir -p "$out"
{
  echo "date: $(date -u +%FT%TZ)"; nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$out/environment.txt" 2>&1
python -m pytest -q -m gpu tests/test_kernel_attention.py tests/test_kernel_rmsnorm.py tests/test_kernels_in_model.py \
  2>&1 | tee "$out/gpu_tests.txt"
tests_rc=${PIPESTATUS[0]}
TRITON_PRINT_AUTOTUNING=1 python tools/bench_kernels.py --out "$out" 2>&1 | tee "$out/bench_log.txt"
bench_rc=${PIPESTATUS[0]}
if [ -n "${OUT:-}" ]; then cp -r "$out" "$OUT/"; fi
echo "gpu tests exit $tests_rc, benchmark exit $bench_rc; results in $out"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
