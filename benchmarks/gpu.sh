#!/usr/bin/env bash
# The GPU benchmark in one command (issue 25), for the GPU machine: installs the wheels that
# benchmarks/gpu_prepare.py put in .gpu/wheels (that machine has no network), then runs
# benchmarks/gpu.py on .gpu/ into $OUT (default outputs/gpu): gpu.json and this whole output as gpu.log.
#   python benchmarks/gpu_prepare.py     # here, once
#   bash benchmarks/gpu.sh               # there; extra arguments go to gpu.py (e.g. --budget_s 400)
#   bash benchmarks/gpu.sh --toy         # toy sizes on a CPU (what the tests run)
# GPU_WORKDIR names another folder than .gpu, PYTHON another interpreter than python3.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-outputs/gpu}"
WORKDIR="${GPU_WORKDIR:-.gpu}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu.log") 2>&1
echo "gpu.sh: $(date -u +%FT%TZ) on $(hostname), workdir $WORKDIR, out $OUT"
if compgen -G "$WORKDIR/wheels/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_site \
        "$WORKDIR"/wheels/*.whl || exit 1
    export PYTHONPATH="/tmp/gpu_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PYTHON" -c "import torch, transformers, datasets, accelerate; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'datasets', datasets.__version__, 'accelerate', accelerate.__version__)" || exit 1
"$PYTHON" benchmarks/gpu.py --workdir "$WORKDIR" --out "$OUT" "$@"
