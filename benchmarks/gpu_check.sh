#!/usr/bin/env bash
# The speed issue's GPU figures in one run on a lent device machine (one H100/H200), from the repository root:
#
#   run(command="bash benchmarks/gpu_check.sh", timeout_s=600)       # the device tool; nothing to carry
#
# The device's own python3 holds everything this needs (torch, transformers, pillow, torchvision; checked on a
# venv of only those here). It prints, and leaves in $OUT (the device's folder that comes back):
#   1. the 4B configuration (random weights, bf16) with a 1024x1024 image: the full exact token sweep, fast vs a
#      naive sample, its time, peak GPU memory and the fraction of the measured matmul rate (target <= 150 s,
#      <= 40 GB), then a profile of its costliest group of batches (top operators by GPU time);
#   2. --estimate on the same configuration: time and FLOPs of the whole estimated map (target <= 5 s).
# Each step has its own time limit, so a slow first step still leaves the second its turn; a sweep stopped by
# --max-seconds extrapolates the rest by its FLOPs (the output says so). A rehearsal on a CPU, small:
#   DEVICE=cpu SIZE="--image-size 64 --num-layers 1" bash benchmarks/gpu_check.sh
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-$(mktemp -d)}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:---image-size 1024}
cd "$(dirname "$0")/.."
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
  python3 -c "import sys, torch, transformers, torchvision, PIL; print('python', sys.version.split()[0], 'torch', \
torch.__version__, 'transformers', transformers.__version__, 'torchvision', torchvision.__version__, 'pillow', \
PIL.__version__, 'cuda', torch.cuda.is_available())"
  python3 benchmarks/bench_sweep.py --arch qwen3-vl-4b $SIZE --flops-only
} 2>&1 | tee "$OUT/environment.log"
timeout 400 python3 benchmarks/bench_sweep.py --arch qwen3-vl-4b $SIZE --device "$DEVICE" --repeat 1 \
  --naive-sample 6 --max-seconds 240 --profile 2>&1 | tee "$OUT/sweep.log"
echo "bench_sweep exit status $?" | tee -a "$OUT/sweep.log"
timeout 150 python3 benchmarks/bench_estimate.py --arch qwen3-vl-4b $SIZE --device "$DEVICE" --no-exact 2>&1 \
  | tee "$OUT/estimate.log"
echo "bench_estimate exit status $?" | tee -a "$OUT/estimate.log"
