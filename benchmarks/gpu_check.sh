#!/usr/bin/env bash
# One-command GPU check of the ML-SWA attention (CUDA machine, torch preinstalled, no network).
#
#   bash benchmarks/gpu_check.sh            # from the repository root; under 8 minutes in all
#
# 1. installs the package (pip install -e . --no-deps --no-build-isolation) if it is not importable;
# 2. pytest -m cuda (every CUDA-marked test: all backends, flex included, against the CPU reference);
# 3. the attention table on cuda up to N=65536 (dense, compact fast, auto), then flex beside compact;
# 4. the train-step table of configs/pretrain_hierarchical.yaml (tokens/s, MFU): auto and dense,
#    then flex.
#
# The package's config layer needs pydantic and pydantic-settings. Where they are missing and there is
# no network, put their wheels in a folder and pass it as WHEELS_DIR (see benchmarks/README.md);
# without them step 2 runs tests/test_attention.py only and step 4 is skipped. Each step has its own
# time limit, so one slow step (a flex compile, say) cannot eat the others' time. Logs go to
# ${OUT_DIR:-/tmp/lht_gpu_check}/.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT_DIR:-${TMPDIR:-/tmp}/lht_gpu_check}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
failed=()

step() { printf '\n=== %s ===\n' "$*"; }
run() {  # run LIMIT_SECONDS LOGNAME CMD...: a step with its own timeout; its output goes to the log too
    local limit=$1 log=$2
    shift 2
    timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee "$OUT_DIR/$log.log"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then
        echo "!!! $log: exit $rc$([ "$rc" -eq 124 ] && echo " (time limit ${limit}s)")"
        failed+=("$log")
    fi
}

step "environment"
$PY -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda, '|',
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA DEVICE')"
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "torch sees no CUDA device: nothing to check"
    exit 1
fi
if ! $PY -c "import lhtcli" 2>/dev/null; then
    echo "installing the package: pip install -e . --no-deps --no-build-isolation"
    $PY -m pip install -q -e . --no-deps --no-build-isolation \
        || { echo "pip install failed; using PYTHONPATH instead"; export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"; }
fi
if [ -n "${WHEELS_DIR:-}" ] && ! $PY -c "import pydantic_settings" 2>/dev/null; then
    echo "installing the wheels of $WHEELS_DIR into /tmp/lht_site"
    $PY -m pip install -q --no-index --no-deps --target /tmp/lht_site "$WHEELS_DIR"/*.whl \
        && export PYTHONPATH="/tmp/lht_site${PYTHONPATH:+:$PYTHONPATH}"
fi
full=1
$PY -c "import pydantic_settings, yaml" 2>/dev/null || full=0
[ "$full" -eq 1 ] || echo "pydantic-settings or pyyaml missing: attention-only checks (set WHEELS_DIR to run all)"

step "pytest -m cuda"
if [ "$full" -eq 1 ]; then
    run 150 pytest $PY -m pytest -m cuda -q -p no:cacheprovider
else
    run 150 pytest $PY -m pytest -m cuda -q -p no:cacheprovider tests/test_attention.py
fi

step "attention table on cuda, N = 256 .. 65536"
run 120 attention $PY benchmarks/attention.py --device cuda --max-n 65536 --dense-max-n 32768 \
    --methods dense,fast,auto --reps 5 --json "$OUT_DIR/attention.json"

step "flex (compiled, extended keys) beside compact fast"
run 75 attention_flex $PY benchmarks/attention.py --device cuda --ns 8192,32768,65536 \
    --methods fast,flex --reps 5 --json "$OUT_DIR/attention_flex.json"

if [ "$full" -eq 1 ]; then
    step "train steps: configs/pretrain_hierarchical.yaml"
    run 90 train_step $PY benchmarks/train_step.py --config configs/pretrain_hierarchical.yaml \
        --device cuda --backends auto,dense --steps 3
    run 60 train_step_flex $PY benchmarks/train_step.py --config configs/pretrain_hierarchical.yaml \
        --device cuda --backends flex --steps 3
else
    step "train steps skipped (no pydantic-settings)"
fi

step "summary"
if [ ${#failed[@]} -eq 0 ]; then
    echo "all GPU checks passed; logs in $OUT_DIR/"
    exit 0
fi
echo "failed or timed out: ${failed[*]} (logs in $OUT_DIR/)"
exit 1
