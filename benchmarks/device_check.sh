#!/usr/bin/env bash
# The performance figures that need a GPU, in one command on a GPU machine lent by the device tool: bf16 slice
# encoding of ViT-S/14 and ViT-B/14 at 224 px (slices/s, fraction of the GPU's bf16 peak) and 100 subjects encoded
# and scored in memory with the bundle's defaults. They go to benchmarks/results/gpu/ (perf.json, perf.md), apart
# from the CPU figures, and to $OUT where the tool sets it. That machine has PyTorch, timm and SciPy but not MONAI,
# nibabel or Ignite: `make device-wheels` here puts them in .whl/, which the call carries. From the repository root:
#   bash benchmarks/device_check.sh [more perf.py options, e.g. --cohort_subjects 20]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi: measuring on the CPU"
PYTHONUNBUFFERED=1 "$PYTHON" benchmarks/perf.py --only encoding cohort --results benchmarks/results/gpu "$@"
if [ -n "${OUT:-}" ]; then cp benchmarks/results/gpu/perf.json benchmarks/results/gpu/perf.md "$OUT"/; fi
