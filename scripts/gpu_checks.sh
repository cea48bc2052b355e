#!/usr/bin/env bash
# The checks only a GPU machine can make (device time is scarce, so they are batched):
#   tests    the gpu-marked tests (kernel accuracy against fp32, every tuner candidate, the Llama
#            training with kernels against the PyTorch ops)
#   kernels  tools/bench_kernels.py: RMSNorm and attention against PyTorch / SDPA and the ceilings
#   step     tools/bench_step.py (llama2-7b-L2 and llama3-8b-L2 presets): one Llama training step,
#            kernels on and off, and the share that RoPE, SwiGLU and cross-entropy kernels could save
# Usage: bash scripts/gpu_checks.sh [tests] [kernels] [step]   (no argument: all three, in that order;
# split them over several calls when one call's time limit is short).
# Results land in benchmarks/results/gpu_<device>/ (archived to $OUT/gpu_<device>.tgz when $OUT is set).
#
# The lent GPU machines reach no package registry: do not run scripts/setup.sh there. Their image's
# python3 already holds CUDA PyTorch, Triton, pytest, transformers and matplotlib, and the kernels
# and benchmarks need no C++ extension; PYTHON=... picks another interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check here')" || exit 1
device=$($PY -c "import re, torch; print(re.sub('[^a-z0-9]+', '_', torch.cuda.get_device_name().lower()).strip('_'))")
out=benchmarks/results/gpu_${device}
mkdir -p "$out"
{
  echo "date: $(date -u +%FT%TZ)  commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$out/environment.txt" 2>&1
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests kernels step)
status=0
for stage in "${stages[@]}"; do
  case "$stage" in
    tests)
      $PY -m pytest -q -m gpu tests/test_kernel_attention.py tests/test_kernel_rmsnorm.py \
        tests/test_kernels_in_model.py 2>&1 | tee "$out/gpu_tests.txt" ;;
    kernels)
      TRITON_PRINT_AUTOTUNING=1 $PY tools/bench_kernels.py --out "$out/kernels" 2>&1 \
        | tee "$out/kernels_log.txt" ;;
    step)  # Llama-2-7B widths, and Llama-3-8B's for its 4x larger vocabulary (the cross entropy)
      ( $PY tools/bench_step.py --preset llama2-7b-L2 --batch 1 --seq 4096 --out "$out/step"; s1=$?
        $PY tools/bench_step.py --preset llama3-8b-L2 --batch 1 --seq 4096 --out "$out/step_llama3"
        s2=$?; exit $(( s1 || s2 )) ) 2>&1 | tee "$out/step_log.txt" ;;
    *) echo "gpu_checks: unknown stage '$stage' (tests, kernels, step)"; exit 2 ;;
  esac
  rc=${PIPESTATUS[0]}
  echo "gpu_checks: $stage exit $rc"
  [ "$rc" -ne 0 ] && status=1
  # The device tool brings back at most 8 files from $OUT: one archive of everything, after each stage.
  if [ -n "${OUT:-}" ]; then tar czf "$OUT/gpu_${device}.tgz" -C benchmarks/results "gpu_${device}"; fi
done
echo "results in $out"
exit $status
