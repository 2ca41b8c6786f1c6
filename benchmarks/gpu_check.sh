#!/usr/bin/env bash
# GPU checks in one call, for a machine with CUDA and the project's .venv already installed
# (installs nothing): the GPU-marked tests, then the HiPe and model benchmarks on the GPU.
#   bash benchmarks/gpu_check.sh            (or: make gpu-check)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
PY=${PY:-.venv/bin/python}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
echo "== GPU tests"
"$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_hipe.py tests/test_models.py
echo "== HiPe benchmark on the GPU (U-Net tile vs forward floor, Occlusion 16/8)"
"$PY" benchmarks/bench_hipe.py --device cuda --repeats 5 --batch-size 64
echo "== HiPe benchmark on the CPU of the same machine, for the ratio"
"$PY" benchmarks/bench_hipe.py --device cpu --repeats 1 --no-occlusion
