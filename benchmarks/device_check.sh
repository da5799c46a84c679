#!/usr/bin/env bash
# GPU readiness check: everything issue 27 asks of a GPU, in one run of under 8 minutes on
# one GPU.  From the repository root:
#
#     bash benchmarks/device_check.sh                  # on a machine with CUDA
#     bash benchmarks/device_check.sh --full-suite     # the whole test suite instead of -m device
#     DEVICE=cpu bash benchmarks/device_check.sh --quick   # a dry run of this script's logic on a CPU
#
# Stages, each under a time budget (a stage that overruns is stopped and counted as failed):
#   1. tests   the tests that take the device (pytest -m device) with IMPLICITNETS_TEST_DEVICE=$DEVICE;
#              the other tests (DDP over gloo, scripts in subprocesses, docs) are CPU by design
#   2. mnist   the default `python -m train.mnist --device $DEVICE` (FC DEQ, then its MLP in the same
#              run, 100 epochs each) and the DEQ ÷ MLP time ratios (whole run, model steps) from
#              its summary.json
#   3. limit   `python benchmarks/limit.py --device $DEVICE` (training step ÷ bare tensor code)
#   4. vs_jax  `python benchmarks/vs_jax.py --device $DEVICE --quick`: the GPU column (torch sides on the
#              device, synchronised; the JAX sides stay on the CPU; its targets are judged on a CPU only)
#
# --quick shrinks every stage (a few test files, one short epoch, limit.py --quick on one case)
# so that the logic runs end to end in a couple of minutes; its numbers measure nothing.
#
# Environment: DEVICE (cuda or cpu; default cuda), PYTHON (default python), OUT (default
# runs/device_check: the stage logs and train.mnist's output).  Exit status: 0 if every stage
# passed, 1 if one failed (a test, an error, a missed benchmark target, an overrun budget),
# 2 if this machine cannot run the check (no CUDA).

set -euo pipefail

DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python}
OUT=${OUT:-runs/device_check}
QUICK=0
FULL_SUITE=0
for arg in "$@"; do
    case "$arg" in
        --quick) QUICK=1 ;;
        --full-suite) FULL_SUITE=1 ;;
        -h | --help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
        *) echo "device_check: unknown option $arg (options: --quick, --full-suite, --help)" >&2; exit 2 ;;
    esac
done

cd "$(dirname "$0")/.."  # the repository root: train/ and tests/ import from here
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# ---------------------------------------------------------------- can this machine run it?
case "$DEVICE" in
    cuda)
        if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
            echo "device_check: DEVICE=cuda, but torch.cuda.is_available() is False on this machine" \
                 "(no GPU, no driver, or a CPU-only torch). DEVICE=cpu bash $0 --quick runs a dry run." >&2
            exit 2
        fi
        GPU=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name(0))") ;;
    cpu)
        GPU="none: DEVICE=cpu is a dry run of the script's logic, not a GPU measurement" ;;
    *)
        echo "device_check: DEVICE must be cuda or cpu (train.mnist's --device), got '$DEVICE'" >&2
        exit 2 ;;
esac

# ---------------------------------------------------------------- the stages and their budgets
# seconds per stage; the three full stages add up to 7.5 minutes
if ((QUICK)); then
    TESTS=(tests/test_gradients.py tests/test_linear.py tests/test_solvers_flat.py -m device)
    MNIST=(--epochs 1 --max-steps 20 --test-limit 1000)
    LIMIT=(--quick --cases 128x200 --modes AID-FP,JacobianFree)
    BUDGET_TESTS=120 BUDGET_MNIST=120 BUDGET_LIMIT=120 BUDGET_JAX=180
elif ((FULL_SUITE)); then
    TESTS=()  # the whole suite: may not fit the 8 minutes
    MNIST=()
    LIMIT=()
    BUDGET_TESTS=600 BUDGET_MNIST=180 BUDGET_LIMIT=90 BUDGET_JAX=60
else
    TESTS=(-m device)
    MNIST=()
    LIMIT=()
    BUDGET_TESTS=160 BUDGET_MNIST=170 BUDGET_LIMIT=80 BUDGET_JAX=60
fi

mkdir -p "$OUT"
SUMMARY=()
FAILED=0
START=$SECONDS

# run_stage NAME BUDGET COMMAND...: runs COMMAND under `timeout BUDGET`, its output shown and
# kept in $OUT/NAME.log; appends "NAME  PASS|FAIL  seconds" to SUMMARY.
run_stage() {
    local name=$1 budget=$2 status begin=$SECONDS
    shift 2
    echo
    echo "=== $name (budget ${budget}s): $*"
    if timeout -k 10 "$budget" "$@" 2>&1 | tee "$OUT/$name.log"; then
        status=PASS
    else
        status=$?
        local missed
        missed=$(grep -c '^- FAIL' "$OUT/$name.log" || true)
        if ((status == 124 || status == 137)); then
            status="FAIL: stopped at its budget of ${budget}s"
        elif grep -q "^FAIL overall" "$OUT/$name.log" && ((QUICK)); then
            status="ran; $missed benchmark targets missed, not counted (--quick measures nothing)"
        elif grep -q "^FAIL overall" "$OUT/$name.log"; then
            status="FAIL: $missed benchmark targets missed (the verdicts in $OUT/$name.log)"
        else
            status="FAIL: exit status $status (see $OUT/$name.log)"
        fi
        [[ $status == FAIL* ]] && FAILED=1
    fi
    SUMMARY+=("$(printf '%-6s %4ds  %s' "$name" $((SECONDS - begin)) "$status")")
}

echo "device_check: device $DEVICE (GPU: $GPU), torch $("$PYTHON" -c 'import torch; print(torch.__version__)')," \
     "$( ((QUICK)) && echo quick || echo full) run, logs in $OUT"

run_stage tests "$BUDGET_TESTS" \
    env IMPLICITNETS_TEST_DEVICE="$DEVICE" "$PYTHON" -m pytest -q -p no:cacheprovider "${TESTS[@]}"

rm -rf "$OUT/mnist"  # no --resume: a fresh run
run_stage mnist "$BUDGET_MNIST" \
    "$PYTHON" -m train.mnist --device "$DEVICE" --out "$OUT/mnist" --no-progress --no-plot "${MNIST[@]}"
if [[ -f "$OUT/mnist/summary.json" ]]; then
    # the whole run (data, evaluation, checkpoints included) and the model's training steps alone
    RATIO=$("$PYTHON" - "$OUT/mnist/summary.json" <<'EOF'
import json, sys

deq = json.load(open(sys.argv[1]))
mlp = deq.get("baseline")
if mlp is None or not deq["seconds"] or not mlp["seconds"] or not mlp.get("step_seconds"):
    print("no ratio: the run has no baseline or no completed epoch")
else:
    print(f"DEQ / MLP time {deq['seconds'] / mlp['seconds']:.2f}x whole run ({deq['seconds']:.1f}s / "
          f"{mlp['seconds']:.1f}s), {deq['step_seconds'] / mlp['step_seconds']:.2f}x model steps; "
          f"test acc {deq['test_acc']:.4f} / {mlp['test_acc']:.4f} after {deq['epochs_completed']} epochs")
EOF
    )
    echo "$RATIO"
    SUMMARY+=("       $RATIO")
fi

run_stage limit "$BUDGET_LIMIT" "$PYTHON" benchmarks/limit.py --device "$DEVICE" "${LIMIT[@]}"
run_stage vs_jax "$BUDGET_JAX" "$PYTHON" benchmarks/vs_jax.py --device "$DEVICE" --quick

echo
echo "=== device_check summary: device $DEVICE, $((SECONDS - START))s in all (target: under 480s on one GPU)"
printf '%s\n' "${SUMMARY[@]}"
if ((FAILED)); then
    echo "device_check: FAIL"
    exit 1
fi
echo "device_check: PASS"
