#!/usr/bin/env bash
# The GPU check in one call, for the lent GPU machine (BENCHMARKS.md, "GPU"): the GPU-marked
# tests, then benchmarks/bench_gpu.py (HiPe vs its forward floor at batch 32/128/512, one
# pipeline tile, a small slide with sync and local:1 with nvidia-smi utilisation, autocast on vs
# off, the demo slide at full depth). Writes to $OUT (default gpu-check-output/): gpu_check.md
# (the tables for BENCHMARKS.md), gpu_check.json, gpu_tests.log.
#
#   1. here, once (needs the package registry):   bash benchmarks/gpu_check.sh --prepare
#   2. on the lent machine, through the device tool's run:
#        command: bash benchmarks/gpu_check.sh     carry: [".whl"]     timeout_s: 540
#   dry run on a CPU (tests/test_gpu_check.py):
#        PY=.venv/bin/python bash benchmarks/gpu_check.sh --device cpu --quick --out DIR
#
# That machine runs its own image: python3 3.12 with torch 2.11, without pydantic,
# segmentation-models-pytorch, zarr, OpenSlide or dask (the project's .venv cannot travel: 64 MiB
# per call). --prepare downloads the missing wheels (benchmarks/gpu_wheels.txt, ~18 MB, CPython
# 3.12 manylinux x86-64) into .whl/, which it git-ignores through .git/info/exclude; the check
# installs them into a temporary folder when the Python it runs lacks them, and imports the
# package itself from this working tree (PYTHONPATH), installing nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
QUICK=()
OUTDIR=${OUT:-gpu-check-output}
PREPARE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --quick) QUICK=(--quick); shift ;;
    --out) OUTDIR=$2; shift 2 ;;
    --prepare) PREPARE=1; shift ;;
    -h | --help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
PY=${PY:-python3}
WHEELS=benchmarks/gpu_wheels.txt
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

if [ "$PREPARE" = 1 ]; then
  exclude=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$exclude")"
  grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
  rm -rf .whl
  platforms=()
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
    manylinux2014_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
  done
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d .whl -r "$WHEELS"
  echo "gpu_check.sh: $(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/ (git-ignored)"
  exit 0
fi

# The wheels, where this Python lacks what they provide (the lent machine).
if ! "$PY" -c "import pydantic, zarr, segmentation_models_pytorch, dask, openslide" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "gpu_check.sh: $PY lacks the project's dependencies and .whl/ holds no wheels;" \
      "run 'bash benchmarks/gpu_check.sh --prepare' first and carry .whl" >&2
    exit 2
  fi
  site=$(mktemp -d "${TMPDIR:-/tmp}/wsi-hipe-site.XXXXXX")
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUTDIR"

"$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__,
      'cuda', torch.cuda.is_available())"
if [ "$DEVICE" != cpu ]; then
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
fi

echo "== GPU-marked tests (skipped without CUDA)"
set +e
# No plugin autoloading: the GPU tests need none but pytest-timeout (the ini's timeout).
PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 "$PY" -m pytest -p pytest_timeout -p no:cacheprovider -m gpu -q \
  tests/test_gpu_ready.py tests/test_models.py tests/test_hipe.py 2>&1 | tee "$OUTDIR/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

echo "== measurements ($DEVICE${QUICK[*]:+, quick})"
"$PY" benchmarks/bench_gpu.py --device "$DEVICE" "${QUICK[@]}" --out "$OUTDIR"
bench_rc=$?
set -e

{
  echo
  echo "GPU-marked tests: $(tail -n 1 "$OUTDIR/gpu_tests.log") (exit $tests_rc)"
} >>"$OUTDIR/gpu_check.md"
echo "gpu_check.sh: tests exit $tests_rc, measurements exit $bench_rc; report in $OUTDIR/gpu_check.md"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
