#!/usr/bin/env bash
# The GPU check: what a session that is lent a GPU runs first. From a clean checkout it
# builds tpx_ext with the CUDA kernels, then checks them on the GPU: python -m tpx_ext, the
# CUDA pytest variants, bench/ops.py and bench/train_step.py timed with CUDA events, and
# short dmc_proprio and dmc_vision training runs with tpx. Log and summary go to one folder
# (few files: a lending machine returns at most 8). Every step has a time limit inside one
# total budget (default 570 s, so that the whole fits a 10-minute command); a failed step is
# recorded and the next one runs, so one run gives the whole picture.
#
# Exit status: 0 every step passed, 1 a step failed (or was left out of the budget),
# 2 bad arguments.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STEPS_ALL=(build selfcheck pytest bench_ops bench_train_step dmc_proprio dmc_vision)
# Each step's own limit in seconds. Their sum is above the budget on purpose: a step gets
# min(its limit, what is left), so a fast build leaves more for the later steps.
declare -A LIMIT=([build]=270 [selfcheck]=45 [pytest]=120 [bench_ops]=120 [bench_train_step]=90
                  [dmc_proprio]=90 [dmc_vision]=120)
RESERVE_S=20   # kept back for the summary and the runs' archive
MIN_STEP_S=15  # a step with less time left than this is not started

usage() {
  cat <<EOF
usage: scripts/gpu_check.sh [options]

Builds tpx_ext with the CUDA kernels and checks it on this machine's GPU, in these steps:
  build             a venv, torch==2.14.1, ninja, pybind11, pip install --no-build-isolation
                    -e ".[dev,dreamer]" with TPX_FORCE_CUDA=1 and TORCH_CUDA_ARCH_LIST of this GPU
  selfcheck         python -m tpx_ext (build facts, the fused op against the reference)
  pytest            the CUDA variants of the tests (pytest -k cuda); none may be skipped
  bench_ops         bench/ops.py --device cuda, short (CUDA events)
  bench_train_step  bench/train_step.py --device cuda, dmc_proprio agent, H 15 and 100
  dmc_proprio       python -m tpx_ext.train --configs dmc_proprio --estimator tpx, short,
                    --precision bf16
  dmc_vision        the same from pixels (--configs dmc_vision; rendering through EGL),
                    --precision 16
Each step has a time limit within the total budget. A failed step is recorded and the next
runs. Exit status 0 when every step passed, 1 when one failed, 2 for bad arguments.
MAX_JOBS (default: the number of cores) and TORCH_CUDA_ARCH_LIST (default: this GPU's
compute capability) are taken from the environment when set.

options:
  --out DIR       folder for summary.md, steps.tsv, gpu_check.log and runs.tar.gz
                  (default runs/gpu_check)
  --skip-build    use the venv as it is (no pip, no compile)
  --steps N       environment steps of each training run (default 5000; at least 2000,
                  the first 1000 are random prefill)
  --only LIST     comma-separated steps to run, e.g. pytest,bench_ops (default: all)
  --budget S      seconds for all steps together (default 570)
  --limit STEP=S  a step's own limit in seconds (repeatable); the defaults:
                  $(for s in "${STEPS_ALL[@]}"; do printf '%s=%s ' "$s" "${LIMIT[$s]}"; done | fold -s -w 62 | sed -e 's/ *$//' -e '1!s/^/                  /')
  --venv DIR      the virtual environment to create or use (default .venv)
  --python PY     the interpreter the venv is made from (default \$PYTHON, else python3)
  --wheels DIR    pip also installs from the wheel files in DIR (--find-links), for a
                  machine without a package index (scripts/gpu_wheels.py fetches them)
  --gl-debs DIR   before the training runs, unpack the .deb files in DIR into / and run
                  ldconfig (root), for a machine without the EGL libraries
  --dry-run       print each step's commands and limits, run nothing
  -h, --help      this help
EOF
}

die() {
  echo "gpu_check.sh: $*" >&2
  echo "(scripts/gpu_check.sh -h for help)" >&2
  exit 2
}

abspath() {  # a path relative to the directory the script was started from
  case "$1" in
    /*) printf '%s\n' "$1" ;;
    *) printf '%s\n' "$PWD/$1" ;;
  esac
}

# --- arguments ------------------------------------------------------------------------
OUT="$ROOT/runs/gpu_check"
SKIP_BUILD=0
STEPS=5000
ONLY=""
BUDGET=570
VENV="$ROOT/.venv"
BASE_PYTHON="${PYTHON:-python3}"
WHEELS=""
GL_DEBS=""
DRY_RUN=0
ARGS_TEXT="$*"
need_value() { [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --out) need_value "$@"; OUT="$(abspath "$2")"; shift 2 ;;
    --skip-build) SKIP_BUILD=1; shift ;;
    --steps) need_value "$@"; STEPS="$2"; shift 2 ;;
    --only) need_value "$@"; ONLY="$2"; shift 2 ;;
    --budget) need_value "$@"; BUDGET="$2"; shift 2 ;;
    --limit)
      need_value "$@"
      [[ "$2" =~ ^([a-z_]+)=([0-9]+)$ ]] || die "--limit wants STEP=SECONDS, got '$2'"
      step="${BASH_REMATCH[1]}" seconds="${BASH_REMATCH[2]}"
      [[ -v "LIMIT[$step]" ]] || die "--limit: unknown step '$step'; steps: ${STEPS_ALL[*]}"
      [[ "$seconds" =~ ^[1-9][0-9]*$ ]] || die "--limit: a limit must be > 0 seconds, got '$2'"
      LIMIT[$step]=$seconds
      shift 2 ;;
    --venv) need_value "$@"; VENV="$(abspath "$2")"; shift 2 ;;
    --python) need_value "$@"; BASE_PYTHON="$2"; [[ "$2" == */* ]] && BASE_PYTHON="$(abspath "$2")"; shift 2 ;;
    --wheels) need_value "$@"; WHEELS="$(abspath "$2")"; shift 2 ;;
    --gl-debs) need_value "$@"; GL_DEBS="$(abspath "$2")"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --out=* | --steps=* | --only=* | --budget=* | --venv=* | --python=* | --wheels=* | --gl-debs=*)
      die "write '${1%%=*} ${1#*=}' (a space, not '=')" ;;
    -*) die "unknown option '$1'" ;;
    *) die "unexpected argument '$1' (options only)" ;;
  esac
done

if ! [[ "$STEPS" =~ ^[1-9][0-9]*$ ]] || ((STEPS < 2000)); then
  die "--steps must be a whole number >= 2000 (the first 1000 steps are random prefill), got '$STEPS'"
fi
[[ "$BUDGET" =~ ^[1-9][0-9]*$ ]] || die "--budget must be a whole number of seconds > 0, got '$BUDGET'"

SELECTED=()
if [[ -n "$ONLY" ]]; then
  IFS=',' read -r -a wanted <<<"$ONLY"
  for w in "${wanted[@]}"; do
    [[ -n "$w" ]] || die "--only '$ONLY' has an empty step name"
    [[ "$w" =~ ^[a-z_]+$ ]] || die "--only: unknown step '$w'; steps: ${STEPS_ALL[*]}"
    [[ -v "LIMIT[$w]" ]] || die "--only: unknown step '$w'; steps: ${STEPS_ALL[*]}"
  done
  for s in "${STEPS_ALL[@]}"; do  # the fixed order, each once
    for w in "${wanted[@]}"; do [[ "$w" == "$s" ]] && { SELECTED+=("$s"); break; }; done
  done
else
  SELECTED=("${STEPS_ALL[@]}")
fi
if ((SKIP_BUILD)); then
  [[ ",$ONLY," == *,build,* ]] && die "--skip-build and --only build contradict each other"
  keep=()
  for s in "${SELECTED[@]}"; do [[ "$s" == build ]] || keep+=("$s"); done
  SELECTED=("${keep[@]}")
  [[ -x "$VENV/bin/python" ]] || die "--skip-build: there is no $VENV/bin/python; build first (run without --skip-build)"
fi
((${#SELECTED[@]})) || die "no step left to run"
[[ -z "$WHEELS" || -d "$WHEELS" ]] || die "--wheels: no folder $WHEELS"
if [[ -n "$GL_DEBS" ]]; then
  compgen -G "$GL_DEBS/*.deb" >/dev/null || die "--gl-debs: no .deb files in $GL_DEBS"
fi
if ((!SKIP_BUILD && !DRY_RUN)); then
  command -v "$BASE_PYTHON" >/dev/null || die "--python: no interpreter '$BASE_PYTHON'"
fi

cd "$ROOT" || exit 2
mkdir -p "$OUT" || die "--out: cannot create $OUT"
LOG="$OUT/gpu_check.log"
TSV="$OUT/steps.tsv"
: >"$LOG"
printf 'step\tstatus\trc\tseconds\tlimit\tcommand\n' >"$TSV"
rm -f "$OUT/summary.md" "$OUT/runs.tar.gz"
if ((DRY_RUN)); then
  # shellcheck disable=SC2016  # the dry run prints the commands with the name unexpanded
  WORK='$WORK'
else
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")" || die "cannot create a scratch folder"
fi
PY="$VENV/bin/python"

# A lending machine may keep the NVIDIA driver's EGL vendor file outside glvnd's search path.
nvidia_egl=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
if [[ -z "${__EGL_VENDOR_LIBRARY_FILENAMES:-}" && -f "$nvidia_egl" ]]; then
  export __EGL_VENDOR_LIBRARY_FILENAMES="$nvidia_egl"
fi
export PYTHONUNBUFFERED=1  # the log is read while a step runs, and kept if it is killed
export ROOT DRY_RUN VENV PY BASE_PYTHON WORK STEPS WHEELS GL_DEBS OUT

# --- helpers the steps use (exported: each step runs in its own bash under timeout) ----
show() {  # a command as it can be pasted into a shell in the repository root
  local out="+" a
  for a in "$@"; do
    a="${a#"$ROOT"/}"
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then out+=" $a"; else out+=" '${a//\'/\'\\\'\'}'"; fi
  done
  printf '%s\n' "$out"
}
run_cmd() {
  [[ "${CMD_ONLY:-0}" == 1 ]] && return 0
  show "$@"
  ((DRY_RUN)) && return 0
  "$@"
}
# The command that names a step in steps.tsv and the summary; CMD_ONLY=1 prints only it.
main_cmd() {
  if [[ "${CMD_ONLY:-0}" == 1 ]]; then
    show "$@" | sed 's/^+ /CMD: /'
    return 0
  fi
  run_cmd "$@"
}
warn() { echo "gpu_check: WARNING: $*"; }
key() { echo "gpu_check: key: $*"; }  # the line the progress output shows after the step

# Runs once per check (the first step that needs it) and keeps the answer in $WORK.
need_cuda() {
  ((DRY_RUN)) && { show "$PY" -c "import torch; assert torch.cuda.is_available()"; return 0; }
  if [[ ! -f "$WORK/cuda_probe" ]]; then
    if [[ ! -x "$PY" ]]; then
      echo "no python at $PY (the build step did not make the venv)" >"$WORK/cuda_probe"
      echo 1 >"$WORK/cuda_probe.rc"
    else
      "$PY" - >"$WORK/cuda_probe" 2>&1 <<'EOF'
import sys
import torch
line = f"torch {torch.__version__} (CUDA {torch.version.cuda})"
if not torch.cuda.is_available():
    print(f"{line}: CUDA is not available to torch")
    sys.exit(1)
major, minor = torch.cuda.get_device_capability()
print(f"{line}: {torch.cuda.get_device_name()} (sm_{major}{minor}), "
      f"{torch.cuda.device_count()} device(s)")
EOF
      echo $? >"$WORK/cuda_probe.rc"
    fi
  fi
  echo "gpu_check: cuda: $(tail -n 1 "$WORK/cuda_probe")"
  if [[ "$(cat "$WORK/cuda_probe.rc")" != 0 ]]; then
    echo "gpu_check: FAIL: this step needs CUDA and torch has none:"
    sed 's/^/  /' "$WORK/cuda_probe"
    return 1
  fi
}

# Puts the base interpreter's packages behind the venv's own: on a machine with no package
# index, the torch and the tools that came with the machine then serve the build.
link_base_packages() {
  local dirs sp own
  [[ -f "$WORK/base_linked" ]] && return 0
  dirs="$("$BASE_PYTHON" -c 'import site; print("\n".join(site.getsitepackages()))')" || return 1
  sp="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || return 1
  echo "+ adding the site-packages of $BASE_PYTHON behind the venv's ($sp/gpu_check_base.pth)"
  ((DRY_RUN)) && return 0
  printf '%s\n' "$dirs" >"$sp/gpu_check_base.pth"
  touch "$WORK/base_linked"
  # A venv can come with its own old setuptools (Python < 3.12 bundles one), which would
  # hide the base's; pyproject.toml's license field needs setuptools >= 77.
  own="$("$PY" -c 'import setuptools, sys; print(setuptools.__version__ if setuptools.__file__.startswith(sys.prefix) else "")' 2>/dev/null)"
  if [[ -n "$own" && "${own%%.*}" =~ ^[0-9]+$ ]] && ((${own%%.*} < 77)); then
    run_cmd "$PY" -m pip uninstall -y -q setuptools || return 1
  fi
}

gpu_arch() {  # compute capability of the first GPU, e.g. 9.0; empty when none is visible
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ' |
      grep -E '^[0-9]+\.[0-9]+$'  # an old driver answers with an error text instead
  fi
}

step_build() {
  if ((DRY_RUN)) || [[ ! -x "$PY" ]]; then
    run_cmd "$BASE_PYTHON" -m venv "$VENV" || return 1
  fi
  export PATH="$VENV/bin:$PATH"  # torch's extension build runs ninja from PATH
  local pip=("$PY" -m pip install --disable-pip-version-check --progress-bar off --retries 1 --timeout 20)
  [[ -n "$WHEELS" ]] && pip+=(--find-links "$WHEELS")
  if ! run_cmd "${pip[@]}" torch==2.14.1 ninja pybind11 "setuptools>=77" wheel; then
    warn "torch==2.14.1 and the build tools could not be installed; building with the packages of $BASE_PYTHON"
    link_base_packages || return 1
  fi
  export TPX_FORCE_CUDA=1
  export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  local arch="${TORCH_CUDA_ARCH_LIST:-$(gpu_arch)}"
  if [[ -z "$arch" ]] && ((!DRY_RUN)); then
    arch="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability() if torch.cuda.is_available() else "")' 2>/dev/null)"
  fi
  # Only this GPU's architecture: one nvcc pass instead of setup.py's two (8.0;9.0).
  if [[ -n "$arch" ]]; then
    export TORCH_CUDA_ARCH_LIST="$arch"
  elif ((DRY_RUN)); then
    export TORCH_CUDA_ARCH_LIST="<this GPU's compute capability>"
  else
    warn "no GPU visible: TORCH_CUDA_ARCH_LIST is left to setup.py (8.0;9.0)"
  fi
  echo "+ export TPX_FORCE_CUDA=1 MAX_JOBS=$MAX_JOBS TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-}"
  local pip_log="$WORK/pip_install.log"
  if ((DRY_RUN)); then
    main_cmd "${pip[@]}" --no-build-isolation -e ".[dev,dreamer]"
  elif ! main_cmd "${pip[@]}" --no-build-isolation -e ".[dev,dreamer]" 2>&1 | tee "$pip_log"; then
    # Without an index the extras' packages cannot be had; the extension itself still can.
    grep -qiE "no matching distribution|could not find a version|failed to establish|network is unreachable|name resolution" "$pip_log" ||
      return 1
    warn "the dev and dreamer extras could not be installed; installing tpx_ext alone (the training steps need dm_control)"
    link_base_packages || return 1
    run_cmd "${pip[@]}" --no-build-isolation --no-deps -e . || return 1
  fi
  # TPX_FORCE_CUDA made the build fail without the CUDA kernels; this checks what loads.
  run_cmd "$PY" -c 'import sys, torch, tpx_ext; i = tpx_ext.build_info(); print("tpx_ext built: torch", torch.__version__, "| CUDA kernels:", ", ".join(i.cuda_archs) or "none"); sys.exit(0 if i.cuda_compiled else 1)' ||
    return 1
  ((DRY_RUN)) || key "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-default}, MAX_JOBS=$MAX_JOBS"
}

step_selfcheck() {
  need_cuda || return 1
  main_cmd "$PY" -m tpx_ext
}

step_pytest() {
  need_cuda || return 1
  local log="$WORK/pytest.log"
  # Every CUDA variant, nothing else; this check's own tests would start it again.
  if ((DRY_RUN)); then
    main_cmd "$PY" -m pytest python_tests -q -p no:cacheprovider -k "cuda and not gpu_check"
    return 0
  fi
  main_cmd "$PY" -m pytest python_tests -q -p no:cacheprovider -k "cuda and not gpu_check" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]} closing
  closing="$(grep -E '^=* ?[0-9]+ (passed|failed|errors?|skipped|deselected)' "$log" | tail -n 1 | tr -d '=')"
  key "${closing:-no pytest closing line}"
  ((rc == 0)) || return "$rc"
  if grep -qE '[0-9]+ skipped' <<<"$closing"; then
    echo "gpu_check: FAIL: CUDA tests were skipped on a machine with a GPU"
    return 1
  fi
}

step_bench_ops() {
  need_cuda || return 1
  # Dreamer-sized and memory-bound rows of the three ops; 0.25 s of timing each keeps the
  # step near a minute plus the compilation of the compiled variant per row.
  main_cmd "$PY" bench/ops.py --device cuda --sizes 2500x12,2500x60,100000x100,1000000x12 \
    --dtypes float32,bfloat16 --budget 0.25
}

step_bench_train_step() {
  need_cuda || return 1
  # The DreamerV1 agent the GPU presets train, with walker_walk's state and action sizes.
  main_cmd "$PY" bench/train_step.py --device cuda --configs dmc_proprio --horizons 15 100 \
    --rounds 5 --obs_dim 24 --action_dim 6
}

prepare_gl() {
  [[ -n "$GL_DEBS" && ! -f "$WORK/gl_done" ]] || return 0
  local f
  for f in "$GL_DEBS"/*.deb; do run_cmd dpkg -x "$f" / || return 1; done
  run_cmd ldconfig || return 1
  ((DRY_RUN)) || touch "$WORK/gl_done"
}

train_run() {  # name preset precision
  need_cuda || return 1
  prepare_gl || return 1
  # A few thousand steps of DreamerV1's agent with tpx: one random episode of prefill, then
  # a training phase every 500 steps (1 update per 20 env steps, half V1's rate, to fit the
  # step's limit), one evaluation of 2 episodes at the start and at the end. Mixed
  # precision: bf16 from states, float16 (with grad scalers) from pixels.
  main_cmd "$PY" -m tpx_ext.train --configs "$2" --task walker_walk --estimator tpx --device cuda \
    --precision "$3" \
    --steps "$STEPS" --prefill 1000 --train_every 500 --train_steps 25 --pretrain 50 \
    --eval_every "$STEPS" --eval_episodes 2 --checkpoint_every "$STEPS" \
    --logdir "$WORK/runs/$1" --quiet
}
step_dmc_proprio() { train_run dmc_proprio dmc_proprio bf16; }
step_dmc_vision() { train_run dmc_vision dmc_vision 16; }

export -f show run_cmd main_cmd warn key need_cuda link_base_packages gpu_arch prepare_gl train_run
for s in "${STEPS_ALL[@]}"; do export -f "step_$s"; done

# --- the run ----------------------------------------------------------------------------
START=$SECONDS
FAILED=()
progress() { printf '[gpu_check +%3ds] %s\n' "$((SECONDS - START))" "$*"; }

{
  echo "===== machine ====="
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "args: ${ARGS_TEXT:-(none)}"
  echo "commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" status --porcelain 2>/dev/null | grep -q . && echo ' (with uncommitted changes)')"
  echo "cores: $(nproc)"
  if command -v nvidia-smi >/dev/null; then
    echo "gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader 2>&1 | head -n 1)"
  else
    echo "gpu: none (no nvidia-smi)"
  fi
  echo "nvcc: $( (command -v nvcc >/dev/null && nvcc --version || /usr/local/cuda/bin/nvcc --version) 2>/dev/null | grep -o 'release [0-9.]*' || echo none)"
  echo "python: $("$BASE_PYTHON" --version 2>&1)"
  echo "budget: $BUDGET s"
  echo "dry run: $DRY_RUN"
} >>"$LOG"

n=${#SELECTED[@]}
progress "GPU check of $ROOT: ${SELECTED[*]}; budget $BUDGET s; output in $OUT"
((DRY_RUN)) || progress "training runs and scratch files: $WORK"
i=0
for s in "${SELECTED[@]}"; do
  i=$((i + 1))
  left=$((BUDGET - (SECONDS - START) - RESERVE_S))
  limit=${LIMIT[$s]}
  ((left < limit)) && limit=$left
  if ((!DRY_RUN && limit < MIN_STEP_S)); then
    progress "$i/$n $s: SKIPPED (${left} s of the budget left)"
    printf '===== step %s: begin (limit 0 s) =====\nnot started: %s s of the %s s budget left\n===== step %s: end: skipped rc=- 0 s =====\n' \
      "$s" "$left" "$BUDGET" "$s" >>"$LOG"
    printf '%s\tskipped\t-\t0\t0\t%s\n' "$s" "out of time budget" >>"$TSV"
    FAILED+=("$s")
    continue
  fi
  cmd_text="$(CMD_ONLY=1 DRY_RUN=1 "step_$s" 2>/dev/null | grep '^CMD: ' | tail -n 1 | cut -c6-)"
  if ((DRY_RUN)); then
    progress "$i/$n $s (limit $limit s):"
    "step_$s" | sed 's/^/    /' | tee -a "$LOG"
    printf '%s\tdry-run\t-\t0\t%s\t%s\n' "$s" "$limit" "$cmd_text" >>"$TSV"
    continue
  fi
  progress "$i/$n $s: running (limit $limit s)"
  echo "===== step $s: begin (limit $limit s) =====" >>"$LOG"
  first_line=$(($(wc -l <"$LOG") + 1))
  t0=$SECONDS
  timeout --kill-after=10 "$limit" bash -c "set -o pipefail; step_$s" >>"$LOG" 2>&1 </dev/null
  rc=$?
  dt=$((SECONDS - t0))
  if ((rc == 0)); then
    status=pass
  elif ((rc == 124 || rc == 137)); then
    status=timeout
  else
    status=fail
  fi
  echo "===== step $s: end: $status rc=$rc $dt s =====" >>"$LOG"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$s" "$status" "$rc" "$dt" "$limit" "$cmd_text" >>"$TSV"
  keyline="$(tail -n +"$first_line" "$LOG" | grep '^gpu_check: key: ' | tail -n 1 | cut -c17-)"
  progress "$i/$n $s: ${status^^} in $dt s${keyline:+ ($keyline)}"
  if [[ $status != pass ]]; then
    FAILED+=("$s")
    tail -n +"$first_line" "$LOG" | grep -v '^=====' | tail -n 15 | sed 's/^/    | /'
  fi
done

if ((!DRY_RUN)) && [[ -d "$WORK/runs" ]]; then
  # Metrics, configs and evaluation GIFs; checkpoints and replay stay in the scratch folder.
  tar -czf "$OUT/runs.tar.gz" -C "$WORK" --exclude='checkpoint*.pt' --exclude=replay --exclude=tb runs ||
    progress "could not archive $WORK/runs"
fi

summary_py="$PY"
[[ -x "$summary_py" ]] || summary_py="$BASE_PYTHON"
if ! "$summary_py" "$ROOT/scripts/gpu_summary.py" --out "$OUT" ${WORK:+--runs "$WORK/runs"}; then
  progress "the summary writer failed; the log is $LOG"
  exit 1
fi
if ((DRY_RUN)); then
  progress "dry run: nothing was run; summary in $OUT/summary.md"
  exit 0
fi
if ((${#FAILED[@]})); then
  progress "FAILED: ${FAILED[*]} ($((SECONDS - START)) s); summary in $OUT/summary.md"
  exit 1
fi
progress "all ${#SELECTED[@]} steps passed ($((SECONDS - START)) s); summary in $OUT/summary.md"
