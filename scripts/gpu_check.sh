#!/usr/bin/env bash
# One GPU check of the CUDA path (about 7 minutes at most on one H200), everything under
# ${OUT:-./gpu_check_out} in at most 8 files:
#   summary.txt         GPU (nvidia-smi, torch's device name), versions, each step's exit status
#   pytest_gpu.log      pytest -m gpu (the test files that carry the gpu marker)
#   gpu_speed.log/json  benchmarks/gpu_speed.py (Llama-3-8B shapes: dense vs 2:4 vs ARMOR)
#   layer_scaling.log/json  benchmarks/layer_scaling.py --device cuda on its 7 shapes, 576x576
#                           to 14336x4096 (SparseGPT vs one ARMOR iteration, float32 products
#                           and bfloat16 ones, which matmul_precision="auto" takes on a GPU)
#   gpu_oneshot.log/json    benchmarks/gpu_oneshot.py (oneshot on a SmolLM2-135M-shaped model)
# Each step runs under its own `timeout`, capped by what is left of GPU_CHECK_BUDGET seconds
# (default 450), so one hang cannot eat the rest. GPU_CHECK_STEPS picks steps (default: all of
# "pytest_gpu gpu_speed layer_scaling gpu_oneshot"); ONESHOT_VARIANTS the oneshot variants
# (default "sparsegpt armor armor+rec"), e.g. for a shorter second run.
#
# Python: $PYTHON, else ./.venv/bin/python, else python3. Where ./.whl holds wheels (packages the
# GPU machine lacks: llmcompressor, compressed-tensors, loguru, datasets, ...), they are installed
# into /tmp/site first; the package itself is used from ./src (PYTHONPATH), not installed.
#
# Without CUDA (no nvidia-smi, or torch.cuda.is_available() False) it says so, checks itself
# (`bash -n` on this file, `--help` of every benchmark it calls) and exits 0 (1 if a check fails).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUT"
BUDGET=${GPU_CHECK_BUDGET:-450}
STEPS=" ${GPU_CHECK_STEPS:-pytest_gpu gpu_speed layer_scaling gpu_oneshot} "
read -r -a VARIANTS <<<"${ONESHOT_VARIANTS:-sparsegpt armor armor+rec}"
BENCHMARKS=(benchmarks/gpu_speed.py benchmarks/layer_scaling.py benchmarks/gpu_oneshot.py)
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }

self_check() {
    local failed=0 script
    bash -n "${BASH_SOURCE[0]}" || failed=1
    for script in "${BENCHMARKS[@]}"; do
        if ! "$PYTHON" "$script" --help >/dev/null 2>>"$SUMMARY"; then
            note "self-check: $script --help failed"
            failed=1
        fi
    done
    return $failed
}

has_cuda() {
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 || return 1
    "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null
}

if [[ -d .whl ]] && compgen -G ".whl/*.whl" >/dev/null && command -v nvidia-smi >/dev/null; then
    note "installing $(ls .whl/*.whl | wc -l) wheels from .whl into /tmp/site"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl >>"$SUMMARY" 2>&1 || note "wheel install failed"
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

if ! has_cuda; then
    note "gpu_check: no CUDA GPU found (nvidia-smi or torch.cuda.is_available() says none);"
    note "nothing measured. Self-check of this script: bash -n and --help of ${BENCHMARKS[*]}"
    if self_check; then
        note "gpu_check: self-check passed"
        exit 0
    fi
    note "gpu_check: self-check FAILED"
    exit 1
fi

# ------------------------------------------------------------------------------ the GPU run
note "gpu_check on $(hostname) at $(date -u '+%Y-%m-%d %H:%M:%S UTC'), budget ${BUDGET} s"
nvidia-smi >>"$SUMMARY" 2>&1
"$PYTHON" - >>"$SUMMARY" 2>&1 <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
try:
    print("device:", torch.cuda.get_device_name(), "| capability", torch.cuda.get_device_capability())
    cusparselt = torch.backends.cusparselt
    print("cuSPARSELt:", cusparselt.version() if cusparselt.is_available() else None)
except Exception as error:  # noqa: BLE001
    print("torch.cuda FAILED:", repr(error))
for name in ("transformers", "accelerate", "huggingface_hub", "pyarrow", "pydantic", "datasets",
             "compressed_tensors", "llmcompressor", "armor_modifier"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"), module.__file__)
    except Exception as error:  # noqa: BLE001 - recorded, the steps below report the effect
        print(name, "IMPORT FAILED:", repr(error))
EOF
tail -n 12 "$SUMMARY"

# step NAME WANT_SECONDS COMMAND...: run under timeout min(WANT, what is left), log to NAME.log
step() {
    local name=$1 want=$2 left rc
    shift 2
    if [[ "$STEPS" != *" $name "* ]]; then
        note "step $name: not selected (GPU_CHECK_STEPS)"
        return
    fi
    left=$((BUDGET - SECONDS - 5))
    if ((left < 15)); then
        note "step $name: skipped, ${left} s of the budget left"
        return
    fi
    ((want > left)) && want=$left
    local start=$SECONDS
    echo "=== $name (timeout ${want} s): $*"
    timeout --kill-after=10 "$want" "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    note "step $name: exit $rc in $((SECONDS - start)) s (timeout ${want} s$( ((rc == 124 || rc == 137)) && echo ", TIMED OUT"))"
}

mapfile -t GPU_TESTS < <(grep -l "pytest.mark.gpu" tests/test_*.py)
step pytest_gpu 90 "$PYTHON" -m pytest -q -m gpu -rs -p no:cacheprovider "${GPU_TESTS[@]}"
step gpu_speed 75 "$PYTHON" benchmarks/gpu_speed.py --json "$OUT/gpu_speed.json"
step layer_scaling 100 "$PYTHON" benchmarks/layer_scaling.py --device cuda \
    --shapes 576x576 896x4864 4864x896 2048x2048 4096x4096 4096x14336 14336x4096 \
    --iterations 10 --precisions float32 bfloat16 --json "$OUT/layer_scaling.json"
step gpu_oneshot 170 "$PYTHON" benchmarks/gpu_oneshot.py --device cuda --layers 30 \
    --samples 32 --seq-len 256 --variants "${VARIANTS[@]}" --json "$OUT/gpu_oneshot.json"
note "gpu_check done in ${SECONDS} s"
exit 0
