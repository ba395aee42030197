#!/usr/bin/env bash
# The GPU acceptance run: one command on a fresh GPU machine with this checkout, one Markdown report.
#   set-up     a virtual environment, .venv-gpu, that sees the packages of the python3 that makes it (torch is
#              usually there already), with only what is missing installed, and vit-train installed in it
#   tests      the tests marked cuda (pytest -m cuda): bf16 and fp16 autocast, the device-resident loaders,
#              --compile, bit-exact resumption, two NCCL processes where there are two GPUs
#   speed      python -m vit_train.bench.model_step: ours, timm's and HF's training step, images/s and MFU against
#              the GPU's dense bf16 peak, for ViT-B_16 at 32 and 224 px and the plain small ViT of the recipe below
#   run        a timed from-scratch run to accuracy on real CIFAR-10: vit-train --config cifar10_vit_small
#              --time-budget 10m, then the images/s and MFU of that real training loop (data path included)
# Every stage is bounded in time; a stage that fails or times out is recorded in the report with the end of its
# log, and the next stage runs.
#
# Usage: scripts/gpu_check.sh [--data-dir DIR] [--time-budget DURATION] [--report FILE] [--wheels DIR]
#                             [-- more vit-train flags]
#   --data-dir DIR      where cifar-10-batches-py/ is, or is made (default: ./data). A missing one is made from the
#                       real CIFAR-10 of ../shared/data or shared/data (make_cifar10.py and cifar10-jpeg.tar.gz; copy
#                       that folder along), else vit-train downloads the official release, which needs internet.
#   --time-budget D     the run stage's vit-train --time-budget, e.g. 5m or 2h (default: 10m); the stage is
#                       killed at 1.5 times it plus 10 minutes
#   --report FILE       default: gpu_report.md. Each stage's full log goes to FILE without .md, plus _logs/.
#   --wheels DIR        install missing packages from these wheels, offline (default: .whl/ when there is one)
#   -- FLAGS            the rest goes to vit-train too (not --name or --output-dir: the report reads the run's
#                       metrics.jsonl in runs/), e.g. -- --compile --batch-size 512
# Needs: an NVIDIA GPU with its driver, python3 >= 3.9, and either a python3 whose torch uses the GPU or a package
#   registry to install one from. Offline (no registry), what is missing must come as wheels: on a machine whose
#   python3 holds torch, torchvision, numpy, tqdm, tensorboard, pytest, timm and transformers, that is usually
#   ml_collections alone: `pip download --no-deps -d .whl ml_collections` where there is a registry, then bring .whl/.
#   Without a GPU it says so in one line and exits with status 2, having changed nothing.
# How long: at most set-up 30 min, tests 30 min, speed 3 x 15 min, run 1.5 x --time-budget + 10 min, MFU 5 min
#   (bounds, not measurements; the report gives each stage's time). Bash 4.2 or newer.
# Exit status: 0 when every stage passed, 1 when one failed (see the report), 2 without a GPU or with bad arguments.
set -uo pipefail

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
fail_usage() { echo "error: $1 (see scripts/gpu_check.sh --help)" >&2; exit 2; }
absolute() { case $1 in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$PWD/$1" ;; esac; }

DATA_DIR=data REPORT=gpu_report.md WHEELS="" TIME_BUDGET=10m TRAIN_FLAGS=()
while (($#)); do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --data-dir | --time-budget | --report | --wheels)
            (($# >= 2)) || fail_usage "$1 needs a value"
            case $1 in
                --data-dir) DATA_DIR=$2 ;; --time-budget) TIME_BUDGET=$2 ;;
                --report) REPORT=$2 ;; --wheels) WHEELS=$2 ;;
            esac
            shift 2 ;;
        --) shift; TRAIN_FLAGS=("$@"); break ;;
        *) fail_usage "unknown argument $1" ;;
    esac
done
DATA_DIR=$(absolute "$DATA_DIR") REPORT=$(absolute "$REPORT")
[[ -z $WHEELS ]] || WHEELS=$(absolute "$WHEELS")
PYTHON=${PYTHON:-python3}

# A GPU first, before anything is written: the driver's list, or else torch's view of it.
if [[ $(nvidia-smi -L 2>/dev/null) != GPU* ]] &&
    ! "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' >/dev/null 2>&1; then
    echo "error: no CUDA GPU visible; gpu_check.sh needs one" >&2
    exit 2
fi

cd "$(dirname "$0")/.." || exit 2
[[ -n $WHEELS || ! -d .whl ]] || WHEELS=$PWD/.whl
LOGS=${REPORT%.md}_logs
mkdir -p "$LOGS" "$(dirname "$REPORT")" || exit 2
VENV=$PWD/.venv-gpu
VPY=$VENV/bin/python
FAILED=() FAILED_SPEED=()

say() { printf '%s\n' "$@" >>"$REPORT"; }
log_tail() { say '```'; tail -n "${2:-12}" "$1" >>"$REPORT"; say '```'; }
stage_failed() {  # stage name, exit status, log
    FAILED+=("$1")
    local why="exit status $2"
    ((${2} == 124)) && why="timed out"
    say "" "**$1 failed** ($why); the end of $(basename "$3"):"
    log_tail "$3"
}

checkout=$(git describe --always --dirty 2>/dev/null || echo unknown)
printf '%s\n' "# vit-train GPU check" "" "$(date -u '+%Y-%m-%d %H:%M UTC'), checkout $checkout" >"$REPORT"
echo "gpu_check: writing $REPORT, logs in $LOGS/"

# ---- set-up ---------------------------------------------------------------------------------------------------
# python3 -m venv --system-site-packages reaches the packages of the base interpreter, not those of a python3 that
# is itself a virtual environment (as on machines whose python3 is torch's own venv): a .pth file adds python3's,
# .pth files of their own included.
setup() {
    if [[ ! -x $VPY ]]; then  # without ensurepip (Debian's python3 lacks it), pip comes from python3's packages
        "$PYTHON" -m venv --system-site-packages "$VENV" ||
            "$PYTHON" -m venv --system-site-packages --without-pip --clear "$VENV" || return
        local sites='import site; print("import site;", *(f"site.addsitedir({d!r});" for d in site.getsitepackages()))'
        "$PYTHON" -c "$sites" >"$(site_packages)/python3_packages.pth" || return
    fi
    local module package missing=() optional=()
    for module in torch:torch torchvision:torchvision numpy:numpy ml_collections:ml_collections tqdm:tqdm \
        tensorboard:tensorboard PIL:pillow pytest:pytest timm:timm transformers:transformers; do
        package=${module#*:} module=${module%%:*}
        "$VPY" -c "import $module" 2>/dev/null && continue
        case $package in timm | transformers) optional+=("$package") ;; *) missing+=("$package") ;; esac
    done
    local pip=("$VPY" -m pip install --disable-pip-version-check --no-input)
    if [[ -n $WHEELS ]]; then pip+=(--no-index --find-links "$WHEELS"); else pip+=(--retries 1 --timeout 20); fi
    echo "missing: ${missing[*]:-none}; peers missing: ${optional[*]:-none}; wheels: ${WHEELS:-none}"
    # (${a[@]+"${a[@]}"}: an empty array under set -u, which bash before 4.4 calls unbound)
    if ((${#missing[@]})); then timeout 1200 "${pip[@]}" "${missing[@]}" || return; fi
    if ((${#optional[@]})); then
        timeout 600 "${pip[@]}" "${optional[@]}" || echo "peers not installed: the speed stage skips them"
    fi
    INSTALLED=(${missing[@]+"${missing[@]}"})
    # vit-train itself, leaving its dependencies alone and needing no registry. Offline, an editable install rests
    # on the build tools python3 happens to have (setuptools >= 64, wheel); without them the checkout goes on the
    # path instead, which is what an editable install amounts to, less the vit-train command (python -m vit_train).
    if timeout 300 "$VPY" -m pip install --disable-pip-version-check --no-input --no-deps --no-build-isolation \
        --no-index -e .; then
        PROJECT="pip install -e . (no dependencies, offline)"
    else
        echo "$PWD" >"$(site_packages)/vit_train_checkout.pth" || return
        PROJECT="the checkout on .venv-gpu's path (pip install -e . failed: see setup.log)"
    fi
}
site_packages() { "$VPY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))'; }
INSTALLED=() PROJECT="not installed"
setup >"$LOGS/setup.log" 2>&1
status=$?
say "" "## Set-up" ""
if [[ ! -x $VPY ]]; then
    stage_failed "set-up" "$status" "$LOGS/setup.log"
    echo "error: could not make .venv-gpu with $PYTHON; see $LOGS/setup.log" >&2
    exit 1
fi
from=${WHEELS:+" (from $WHEELS, offline)"}
base=$("$PYTHON" -c 'import sys; print(sys.executable)')
say "- environment: .venv-gpu on the packages of $base; installed there: ${INSTALLED[*]:-nothing}${INSTALLED[*]:+$from}"
say "- vit-train: $PROJECT"
"$VPY" - >>"$REPORT" 2>>"$LOGS/setup.log" <<'EOF'
import importlib.metadata, platform, subprocess, torch
def version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                        text=True).stdout.split("\n")[0] or "unknown"
gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
print(f"- GPU: {', '.join(gpus) or 'none visible to torch'}; driver {driver}")
print(f"- torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}), "
      f"Python {platform.python_version()}; timm {version('timm')}, transformers {version('transformers')}")
EOF
((status == 0)) || stage_failed "set-up" "$status" "$LOGS/setup.log"
if ! "$VPY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    torch_build=$("$VPY" -c 'import torch; print(torch.__version__, "built for CUDA", torch.version.cuda)' 2>&1)
    line="error: torch in .venv-gpu cannot use the GPU (${torch_build##*$'\n'}); install a CUDA build of torch"
    say "" "$line"
    echo "$line" >&2
    exit 2
fi

# ---- tests ----------------------------------------------------------------------------------------------------
# --continue-on-collection-errors: a test file that cannot be imported (a missing optional package) is reported
# rather than stopping the CUDA tests.
say "" "## Tests marked cuda: \`pytest -m cuda\`" ""
junit=$(mktemp) || exit 1
timeout -k 60 1800 "$VPY" -m pytest -m cuda -q -rA --continue-on-collection-errors --junitxml="$junit" \
    >"$LOGS/tests.log" 2>&1
status=$?
if [[ -s $junit ]]; then
    "$VPY" - "$junit" >>"$REPORT" <<'EOF'
import sys, xml.etree.ElementTree as ET
suite = ET.parse(sys.argv[1]).getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
print(f"{passed} passed, {counts['failures']} failed, {counts['errors']} errors, {counts['skipped']} skipped "
      f"in {float(suite.get('time', 0)):.0f} s\n\n| test | result | seconds |\n| --- | --- | --- |")
for case in suite.iter("testcase"):
    outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
    result = "passed" if outcome is None else outcome.tag.replace("failure", "failed")
    message = (outcome.get("message") or "").strip() if outcome is not None else ""
    if message:
        result += ": " + message.splitlines()[0][:160].replace("|", "/")
    name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
    print(f"| {name} | {result} | {float(case.get('time', 0)):.1f} |")
EOF
fi
((status == 0)) || stage_failed "tests" "$status" "$LOGS/tests.log"

# ---- speed ----------------------------------------------------------------------------------------------------
say "" "## Training-step speed: \`python -m vit_train.bench.model_step --device cuda --precision bf16\`" ""
say "One step: forward, backward, fused AdamW, bf16 autocast; medians of 5 rounds of 10 steps, the three" \
    "implementations in turn. MFU: the step's FLOPs (torch.utils.flop_counter) per second over the peak named." ""
for case in vit-b16-32 small-vit-32 vit-b16-224; do
    timeout -k 60 900 "$VPY" -m vit_train.bench.model_step --device cuda --precision bf16 --case "$case" --repeats 5 \
        --steps 10 --markdown >"$LOGS/speed_$case.log" 2>&1
    status=$?
    ((status == 0)) || FAILED_SPEED+=("$case:$status")
done
grep -h '^|' "$LOGS"/speed_*.log 2>/dev/null | awk '!seen[$0]++' >>"$REPORT"
grep -h 'skipped, .* is not installed' "$LOGS"/speed_*.log 2>/dev/null | sort -u | sed 's/^ */- /' >>"$REPORT"
for failure in ${FAILED_SPEED[@]+"${FAILED_SPEED[@]}"}; do
    stage_failed "speed case ${failure%%:*}" "${failure#*:}" "$LOGS/speed_${failure%%:*}.log"
done

# ---- run ------------------------------------------------------------------------------------------------------
say "" "## From-scratch run: the plain small ViT (configs/cifar10_vit_small.py) on CIFAR-10" ""
data_note="the folder given"
if [[ ! -d $DATA_DIR/cifar-10-batches-py ]]; then
    for maker in ../shared/data/make_cifar10.py shared/data/make_cifar10.py; do
        [[ -f $maker ]] || continue
        if "$VPY" "$maker" "$DATA_DIR" >"$LOGS/data.log" 2>&1; then
            data_note="the JPEG copy, made by $maker"
        else
            stage_failed "making CIFAR-10" "$?" "$LOGS/data.log"
        fi
        break
    done
fi
[[ -d $DATA_DIR/cifar-10-batches-py ]] || data_note="the official release, downloaded by vit-train"
NAME=gpu_check_$(date -u +%Y%m%d-%H%M%S)
command=("$VPY" -m vit_train --config cifar10_vit_small --data-dir "$DATA_DIR" --device cuda --quiet --name "$NAME"
    --time-budget "$TIME_BUDGET" ${TRAIN_FLAGS[@]+"${TRAIN_FLAGS[@]}"})
say "- command: \`python -m vit_train ${command[*]:3}\`" "- data: CIFAR-10 in $DATA_DIR, $data_note"
limit=$("$VPY" -c 'import sys; from vit_train.budget import budget_seconds; print(round(1.5 * budget_seconds(sys.argv[1]) + 600))' "$TIME_BUDGET" 2>>"$LOGS/run.log") || limit=7200
started=$(date +%s.%N)
timeout -k 120 "$limit" "${command[@]}" >"$LOGS/run.log" 2>&1  # -k: vit-train saves on SIGTERM
status=$?
seconds=$("$VPY" -c 'import sys; print(round(float(sys.argv[2]) - float(sys.argv[1])))' "$started" "$(date +%s.%N)")
say "- wall time: $((seconds / 60)) min $((seconds % 60)) s"
grep -E '^(time budget|expected duration|done:)' "$LOGS/run.log" | sed 's/^/- vit-train: /' >>"$REPORT"
if [[ -s runs/$NAME/metrics.jsonl ]]; then
    "$VPY" - "runs/$NAME/metrics.jsonl" >>"$REPORT" <<'EOF'
import json, sys
records = [json.loads(line) for line in open(sys.argv[1])]
last = records[-1]
best = max(max(r["eval_accuracy"], r.get("eval_ema_accuracy", 0)) for r in records)
print(f"- final: step {last['step']} (epoch {last['epoch']:.1f}), test accuracy {last['eval_accuracy']:.2%}, "
      f"best {best:.2%}; {last['images_per_sec']:.0f} img/s in its last window")
print("- test accuracy by step: " + ", ".join(f"{r['step']}: {r['eval_accuracy']:.1%}" for r in records))
EOF
fi
((status == 0)) || stage_failed "run" "$status" "$LOGS/run.log"
if [[ -s runs/$NAME/metrics.jsonl ]]; then  # beside the bare step's MFU above: the loop's, data path included
    timeout -k 30 300 "$VPY" -m vit_train.bench.model_step --device cuda --run "runs/$NAME" >"$LOGS/loop_mfu.log" 2>&1
    status=$?
    grep '^- the real training loop' "$LOGS/loop_mfu.log" >>"$REPORT"
    ((status == 0)) || stage_failed "loop MFU" "$status" "$LOGS/loop_mfu.log"
fi

say "" "## Result" "" "${FAILED[*]:+Failed: ${FAILED[*]}.}${FAILED[*]:-Every stage passed.} Logs: $LOGS/"
echo "gpu_check: ${FAILED[*]:+failed: ${FAILED[*]}; }report in $REPORT"
((${#FAILED[@]} == 0))
