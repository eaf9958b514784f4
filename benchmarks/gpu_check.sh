#!/usr/bin/env bash
# One GPU, under 8 minutes: the loader alone, the scratch CNN on 50k synthetic images, and ResNet-18 at
# 224 px, each against pure model steps. Targets on an H200-class GPU: loader >= 100k img/s, CNN epoch
# (50k images) <= 1 s, ResNet-18 at 224 >= 8k img/s training.
# Usage: bash benchmarks/gpu_check.sh   (after pip install -e ".[test]")
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python benchmarks/throughput.py --device cuda --model cnn --images 50000 --batch-size 512 --repeats 2 --workers 8
python benchmarks/throughput.py --device cuda --model resnet18 --input-size 224 --images 20480 --batch-size 256 \
    --repeats 1 --workers 8
