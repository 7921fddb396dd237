#!/usr/bin/env bash
# The GPU slot script: the figures of one short GPU slot, in under 8 minutes of wall time on an
# H100 / H200 (slots are about 15 minutes, machine start-up included). docs/gpu.md says what to
# run first on a newly lent GPU and how to read what this writes.
#
#   bash benchmarks/run_gpu.sh OUT_DIR [DATA_ROOT]
#   bash benchmarks/run_gpu.sh --smoke OUT_DIR     # CPU: every Python step with tiny shapes (CI)
#
# The interpreter is $PYTHON if set, else this checkout's .venv/bin/python if present, else
# python3 (on the GPU machines, python3 is the one that holds PyTorch). The checkout's package is
# staged (spafl/ with kernels/ as spafl.kernels, as setup.py maps them) into a temporary folder
# put first on PYTHONPATH, so the code timed is this tree's, installed or not.
#
# SPAFL_COST_MODEL names the cost model script (default benchmarks/model.py).
#
# Everything lands in OUT_DIR (commit it as benchmarks/results/<device>/):
#   progress.log         one line per step: start, end, exit status, seconds (also on stdout)
#   preflight.txt        benchmarks/preflight.py: interpreter, CUDA torch, Triton, the package from
#                        this tree, one small kernel of each kind against the reference. A failed
#                        preflight stops the script with one line (exit status 1)
#   environment.txt      device, driver, versions, git commit
#   warmup.txt           benchmarks/warmup.py: every kernel the later steps launch, compiled once
#   tests.log            native GPU tests, the bounded subset SPAFL_GPU_QUICK=1 (see tests/test_gpu.py)
#   kernels.csv          benchmarks/kernels.py: suites large (with the 4096x4096 Linear at 512 and
#                        128 rows), federated and resnet18; bf16; densities 1, 0.5, 0.1; ops fwd
#                        and fwd+bwd; every provider; fixed kernel configurations
#   model_pairs.csv      benchmarks/model.py (when present): the modelled cost beside every
#                        measured row of kernels.csv (model_pairs.txt prints them side by side)
#   e2e.csv              benchmarks/e2e.py step table: a training step of each federated model at
#                        densities 1, 0.5, 0.1 (fp32 models, TF32 allowed, as e2e.py sets it)
#   kernels_tuned.csv    the large Linear case again with autotuning (SPAFL_AUTOTUNE=1)
#   kernels_compact.csv  the large Linear case with the compacted-weight path (SPAFL_COMPACT_WEIGHT=always)
#   *.txt                each step's console output; summary.md and plots/ from the CSVs
# The benchmark scripts append every row to their CSV as soon as it is measured, so a step cut
# by its timeout keeps the rows it measured, and the next step starts regardless.
#
# Time budget (seconds of wall time). Every step runs under `timeout`, shortened so that it
# ends before the global deadline BUDGET_S (460 s) minus what the later steps reserve:
#   0. preflight: a few small compiles and launches                           ~20 (limit 90)
#   1. environment                                                              ~5
#   2. in parallel: the compile warm-up (one process; each distinct kernel specialisation
#      compiled once, on one thread per core) and the native tests (four processes split by
#      the shapes they compile)                                                  <= 150
#   3. kernels.csv: 27 cases x 3 densities x 2 ops x 6 providers = 972 timings. do_bench with
#      --reps 3, ~80 ms per timing, plus input set-up (the large cases draw up to 4 x 67M
#      random numbers on the CPU: ~5 s per case): large <= 55, federated <= 40,
#      resnet18 <= 90                                                            <= 185
#   3b. model_pairs.csv (if benchmarks/model.py exists)                          <= 20
#   4. e2e.csv: 4 models x 3 densities x 3 providers = 36 timings of 10 to 100 ms steps  <= 60
#   5. the two large-case variants: 3 providers x 3 densities x 2 ops = 18 timings each  <= 60
#   6. summary and plots                                                          <= 20
# The deadline keeps it under 8 minutes whatever happens: a step that would start with less
# than 5 s left is skipped, and the extras of step 5 are the first to be cut.
set -uo pipefail
cd "$(dirname "$0")/.."
smoke=0
if [[ ${1:-} == --smoke ]]; then
    smoke=1
    shift
fi
out=$(realpath -m "${1:?usage: run_gpu.sh [--smoke] OUT_DIR [DATA_ROOT]}")
data=${2:-}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# The smoke run checks the steps, not their speed: on a shared CPU every step gets 4x its time.
if ((smoke)); then scale=4; else scale=1; fi
BUDGET_S=${BUDGET_S:-$((460 * scale))}
start=$(date +%s)

log() { echo "[$(($(date +%s) - start))s] $*" | tee -a "$out/progress.log"; }
die() {
    log "$*"
    exit 1
}

# The interpreter: checked before anything runs, so that a missing one is one clear line.
if [[ -n ${PYTHON:-} ]]; then
    py=$PYTHON
elif [[ -x .venv/bin/python ]]; then
    py=$PWD/.venv/bin/python
else
    py=python3
fi
command -v "$py" >/dev/null 2>&1 || die "preflight failed: no Python interpreter '$py' (set PYTHON=/path/to/python)"
py=$(command -v "$py")

# This tree's package, staged as setup.py maps it (kernels/ is spafl.kernels).
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/spafl" && cp -r spafl/. "$stage/spafl/" && cp -r kernels "$stage/spafl/kernels" ||
    die "preflight failed: could not stage spafl/ and kernels/ into $stage"
export PYTHONPATH="$stage${PYTHONPATH:+:$PYTHONPATH}" SPAFL_STAGED=$stage

# run_step NAME SECONDS RESERVE CMD...: run CMD under a timeout of SECONDS, shortened so that
# RESERVE seconds of the global budget stay for the later steps; output in OUT_DIR/NAME.txt.
run_step() {
    local name=$1 want=$(($2 * scale)) reserve=$(($3 * scale))
    shift 3
    local left=$((BUDGET_S - reserve - ($(date +%s) - start)))
    local limit=$((want < left ? want : left))
    if ((limit < 5)); then
        log "skip  $name (budget spent)"
        return 0
    fi
    log "start $name (timeout ${limit}s)"
    local t0 rc
    t0=$(date +%s)
    timeout --kill-after=5 "$limit" "$@" >"$out/$name.txt" 2>&1
    rc=$?
    log "end   $name: exit $rc$( ((rc == 124 || rc == 137)) && echo ' (timed out: rows so far kept)'), $(($(date +%s) - t0))s"
    return 0
}

log "run_gpu.sh$( ((smoke)) && echo ' --smoke') -> $out, python $py"

# 0. Preflight: stops the script with one line when this machine cannot run the set.
if ((smoke)); then
    export TRITON_INTERPRET=1
    preflight=(--cpu)
else
    preflight=()
fi
timeout --kill-after=5 $((90 * scale)) "$py" benchmarks/preflight.py "${preflight[@]}" >"$out/preflight.txt" 2>&1
rc=$?
if ((rc != 0)); then
    line=$(grep -m1 '^preflight failed' "$out/preflight.txt")
    ((rc == 124 || rc == 137)) && line="preflight failed: no answer within $((90 * scale)) s (see $out/preflight.txt)"
    [[ -n $line ]] || line="preflight failed: exit $rc: $(tail -n1 "$out/preflight.txt")"
    die "$line"
fi
unset TRITON_INTERPRET  # the benchmarks on CPU take the compact backend; the preflight ran the interpreter
log "$(tail -n1 "$out/preflight.txt")"

# 1. Environment.
{
    echo "date $(date -u +%FT%TZ)"
    echo "git $(git rev-parse HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
    echo "python $py"
    ((smoke)) || nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>&1
    "$py" - <<'PY'
import torch, triton, spafl
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
cap = torch.cuda.get_device_capability(0) if torch.cuda.is_available() else None
print("device", name, "capability", cap)
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "spafl", spafl.__version__)
PY
} >"$out/environment.txt" 2>&1
device=$(grep -m1 '^device' "$out/environment.txt")
log "environment: $device"
# The cost model's device: the H200's figures for an H200, else the H100's.
if [[ $device == *H200* ]]; then model_device=h200; else model_device=h100; fi

if ((smoke)); then
    kernel_args=(--dtypes float32 --densities 0.5 --ops fwd fwd+bwd --reps 1 --min-sample-ms 0.1)
    suites=(smoke)
    large=smoke-linear
    e2e_args=(--tables step --models lenet5 --densities 0.5 --reps 1 --min-sample-ms 0.1 --csv "$out/e2e.csv")
else
    kernel_args=(--dtypes bfloat16 --densities 1 0.5 0.1 --ops fwd fwd+bwd --reps 3)
    suites=(large federated resnet18)
    large=large-8192x4096x4096
    e2e_args=(--tables step --models lenet5 conv4 resnet18 vit --densities 1 0.5 0.1 --reps 3 --csv "$out/e2e.csv")
fi
[[ -n $data ]] && e2e_args+=(--data-root "$data")

# 2. Compile warm-up and native tests, in parallel (compiles are CPU work; the GPU work is small).
if ((smoke)); then
    run_step warmup 60 60 env SPAFL_AUTOTUNE=0 "$py" benchmarks/warmup.py --smoke
    log "native tests: none on the CPU (tests/test_gpu.py needs a CUDA device)"
else
    log "start warm-up (one process, $(nproc) compile threads) and native tests (4 processes), timeout 150s"
    timeout --kill-after=5 150 env SPAFL_AUTOTUNE=0 "$py" benchmarks/warmup.py --jobs "$(nproc)" --large-case "$large" \
        >"$out/warmup.txt" 2>&1 &
    warm_pid=$!
    # Four test processes, split by the shapes they compile (each shape is a compile of every
    # kernel; the autotuning test compiles every candidate configuration).
    test_groups=("not conv and not autotuned" "conv and (64x64 or offsets or tf32 or never_synchronises)"
                 "conv and not (64x64 or offsets or tf32 or never_synchronises)" "autotuned")
    test_pids=()
    for i in 0 1 2 3; do
        SPAFL_GPU_QUICK=1 SPAFL_AUTOTUNE=0 timeout --kill-after=5 150 "$py" -m pytest -q -p no:cacheprovider \
            tests/test_gpu.py -k "${test_groups[$i]}" >"$out/tests_$i.log" 2>&1 &
        test_pids+=($!)
    done
    wait "$warm_pid"
    log "end   warm-up: exit $?: $(tail -n1 "$out/warmup.txt")"
    wait "${test_pids[@]}"
    cat "$out"/tests_[0-3].log >"$out/tests.log"
    log "end   tests: $(for i in 0 1 2 3; do tail -n1 "$out/tests_$i.log"; done | paste -sd ';')"
fi

# 3. Kernel benchmarks, fixed configurations, one suite at a time into one CSV.
declare -A kernel_time=([smoke]=60 [large]=55 [federated]=40 [resnet18]=90)
declare -A kernel_reserve=([smoke]=60 [large]=205 [federated]=165 [resnet18]=80)
append=()
for suite in "${suites[@]}"; do
    run_step "kernels_$suite" "${kernel_time[$suite]}" "${kernel_reserve[$suite]}" env SPAFL_AUTOTUNE=0 \
        "$py" benchmarks/kernels.py --suite "$suite" "${kernel_args[@]}" --csv "$out/kernels.csv" "${append[@]}"
    [[ -s $out/kernels.csv ]] && append=(--append)
done

# 3b. The cost model beside every measured row (another script's; its failure stops nothing).
model=${SPAFL_COST_MODEL:-benchmarks/model.py}
if [[ -f $model && -s $out/kernels.csv ]]; then
    run_step model_pairs 20 60 "$py" "$model" pair --measured "$out/kernels.csv" --device "$model_device" \
        --out "$out/model_pairs.csv"
else
    log "skip  model_pairs ($([[ -f $model ]] && echo 'no kernel rows' || echo "no $model"))"
fi

# 4. End-to-end training steps.
run_step e2e 60 40 env SPAFL_AUTOTUNE=0 "$py" benchmarks/e2e.py "${e2e_args[@]}"

# 5. The large Linear case with autotuning, then with the compacted-weight path.
run_step kernels_tuned 30 20 env SPAFL_AUTOTUNE=1 "$py" benchmarks/kernels.py --suite "${suites[0]}" \
    --cases "$large" "${kernel_args[@]}" --providers dense smaller spafl-skip --csv "$out/kernels_tuned.csv"
run_step kernels_compact 30 20 env SPAFL_AUTOTUNE=0 SPAFL_COMPACT_WEIGHT=always "$py" benchmarks/kernels.py \
    --suite "${suites[0]}" --cases "$large" "${kernel_args[@]}" --providers dense smaller spafl-skip \
    --csv "$out/kernels_compact.csv"

# 6. Summary and plots from whatever was measured.
args=()
[[ -s $out/kernels.csv ]] && args+=(--kernels "$out/kernels.csv")
[[ -s $out/e2e.csv ]] && args+=(--e2e "$out/e2e.csv")
if ((${#args[@]})); then
    run_step summary 20 0 "$py" benchmarks/summary.py "${args[@]}"
    [[ -s $out/summary.txt ]] && cp "$out/summary.txt" "$out/summary.md"
    for csv in kernels e2e; do
        [[ -s $out/$csv.csv ]] && run_step "plot_$csv" 15 0 "$py" benchmarks/plot.py "$out/$csv.csv" --out "$out/plots"
    done
fi
rows() { if [[ -s $1 ]]; then echo $(($(wc -l <"$1") - 1)); else echo 0; fi; }
log "done: $(rows "$out/kernels.csv") kernel rows, $(rows "$out/model_pairs.csv") model pairs," \
    "$(rows "$out/e2e.csv") e2e rows"
