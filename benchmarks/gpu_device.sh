#!/usr/bin/env bash
# The whole GPU check of issue 13 in one command, for the `device` machine (README "Real models on GPUs").
#
#   here, once:   bash benchmarks/gpu_device.sh --download     # the wheels of benchmarks/gpu_wheels.txt into .whl/
#   there:        bash benchmarks/gpu_device.sh                # with .whl carried; results under $OUT
#   here, a dry run of the same steps on the CPU (small models, no install):
#                 DEVICE=cpu TINY=1 OUT=/tmp/gpu-out bash benchmarks/gpu_device.sh
#
# Steps: install the wheels into /tmp/site; note the GPU and versions; write the random full-size models
# (python -m models.fullsize, on the GPU); the correctness checks (benchmarks/gpu_checks.py); the benchmark
# (benchmarks/gpu.py) with what is left of TOTAL seconds (default 450). Each step's log and JSON land in $OUT
# (at most 8 files come back). The last lines printed are the two JSON reports' headlines.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=.whl
if [ "${1:-}" = "--download" ]; then
    mkdir -p "$WHEELS"
    platforms=""
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
             manylinux2014_x86_64 manylinux1_x86_64; do platforms="$platforms --platform $p"; done
    # shellcheck disable=SC2086
    exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        $platforms -d "$WHEELS" -r benchmarks/gpu_wheels.txt
fi

TOTAL=${TOTAL:-450}
DEVICE=${DEVICE:-cuda:0}
OUT=${OUT:-/tmp/gpu-out}
TINY_FLAG=""
[ -n "${TINY:-}" ] && TINY_FLAG="--tiny"
mkdir -p "$OUT"
start=$SECONDS
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 FARM_METRICS_PORT=0
export FARM_MODEL_DIR=${FARM_MODEL_DIR:-/tmp/farm-models}
PY=${PYTHON:-python3}

if [ "$DEVICE" != "cpu" ]; then
    ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "no wheels in $WHEELS: run with --download here first"; exit 2; }
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl || exit 3
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi

{
    date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>&1
    $PY -c "import torch, diffusers, transformers, peft, celery, sqlalchemy, pydantic; print('torch', torch.__version__,
'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft',
peft.__version__, 'celery', celery.__version__, 'sqlalchemy', sqlalchemy.__version__, 'pydantic', pydantic.__version__)"
    nproc; free -g | head -2; df -h /tmp | tail -1
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [ -z "$TINY_FLAG" ]; then
    echo "== writing the random full-size models into $FARM_MODEL_DIR ($((SECONDS - start)) s)"
    timeout 240 $PY -m models.fullsize --out "$FARM_MODEL_DIR" --device "${DEVICE%%:*}" --distilled sd15 \
        > "$OUT/write.log" 2>&1 || { tail -30 "$OUT/write.log"; echo "writing the models failed"; exit 4; }
    tail -1 "$OUT/write.log" | cut -c1-600
fi

echo "== correctness checks ($((SECONDS - start)) s)"
FARM_DATA_DIR=/tmp/farm-checks timeout 240 $PY benchmarks/gpu_checks.py --device "$DEVICE" $TINY_FLAG \
    --out "$OUT/checks.json" > "$OUT/checks.log" 2>&1
echo "checks exit $?"
grep -E "^[a-z0-9_]+: (ok|FAILED)" "$OUT/checks.log" | cut -c1-400

left=$((TOTAL - (SECONDS - start) - 20))
echo "== benchmark, budget $left s ($((SECONDS - start)) s)"
FARM_DATA_DIR=/tmp/farm-bench timeout $((left + 60)) $PY benchmarks/gpu.py --device "$DEVICE" $TINY_FLAG \
    --budget-s "$left" --out "$OUT/gpu.json" > "$OUT/gpu.log" 2>&1
echo "benchmark exit $?"
grep -E "^(sd15|sdxl|e2e|skipped|==)|FAILED" "$OUT/gpu.log" | cut -c1-300
echo "== done in $((SECONDS - start)) s"
$PY - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("checks.json", "gpu.json"):
    try:
        data = json.loads((out / name).read_text())
    except (OSError, ValueError) as exc:
        print(name, "missing:", exc)
        continue
    keep = {k: v for k, v in data.items() if k not in ("rows", "checks")}
    if "checks" in data:
        keep["failed_checks"] = [k for k, v in data["checks"].items() if not v["ok"]]
    print(json.dumps(keep))
PY
