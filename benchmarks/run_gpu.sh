#!/usr/bin/env bash
# The GPU slot script: the figures of one short GPU slot, in under 8 minutes of wall time on an
# H100 / H200 (slots are about 15 minutes, machine start-up included).
#
#   bash benchmarks/run_gpu.sh OUT_DIR [DATA_ROOT]
#
# Everything lands in OUT_DIR (commit it as benchmarks/results/<device>/):
#   progress.log         one line per step: start, end, exit status, seconds (also on stdout)
#   environment.txt      device, driver, versions, git commit
#   tests.log            native GPU tests, the bounded subset SPAFL_GPU_QUICK=1 (see tests/test_gpu.py)
#   kernels.csv          benchmarks/kernels.py: suites large, federated and resnet18; bf16; densities
#                        1, 0.5, 0.1; ops fwd and fwd+bwd; every provider; fixed kernel configurations
#   e2e.csv              benchmarks/e2e.py step table: a training step of each federated model at
#                        densities 1, 0.5, 0.1 (fp32 models, TF32 allowed, as e2e.py sets it)
#   kernels_tuned.csv    the large Linear case again with autotuning (SPAFL_AUTOTUNE=1)
#   kernels_compact.csv  the large Linear case with the compacted-weight path (SPAFL_COMPACT_WEIGHT=always)
#   *.txt                each step's console output; summary.md and plots/ from the CSVs
# Both benchmark scripts append every row to their CSV as soon as it is measured, so a step cut
# by its timeout keeps the rows it measured, and the next step starts regardless.
#
# Time budget (seconds of wall time). Every step runs under `timeout`, shortened so that it
# ends before the global deadline BUDGET_S (460 s) minus what the later steps reserve:
#   1. environment                                                              ~10
#   2. on the CPU cores, in parallel: the compile warm-up (one process per benchmark case and
#      per distinct threshold layer of the e2e models, 10 at a time, one repetition: it fills
#      Triton's on-disk cache, so the timed runs compile nothing) and the native tests (four
#      processes of up to 40 tests and about 30 compiles each). 45 warm-up jobs of ~6 s start-up + 4
#      to 10 kernel compiles of 2 to 5 s each: about 4 rounds of 25 to 40 s       <= 150
#   3. kernels.csv: 25 cases x 3 densities x 2 ops x 6 providers = 900 timings. do_bench with
#      --reps 3: 25 ms warm-up + 30 ms of repeats + its overhead, ~80 ms per timing: ~75 s,
#      plus input set-up (the large case draws 4 x 67M random numbers on the CPU: ~5 s per
#      case): large <= 40, federated <= 40, resnet18 <= 90                        <= 170
#   4. e2e.csv: 4 models x 3 densities x 3 providers = 36 timings of 10 to 100 ms steps  <= 60
#   5. the two large-case variants: 3 providers x 3 densities x 2 ops = 18 timings each;
#      the tuned run benchmarks up to 4 candidate configurations per kernel at its first call
#      (compiled in step 2)                                                        <= 60
#   6. summary and plots                                                          <= 20
# Expected total: about 6 minutes; the deadline keeps it under 8 whatever happens. The
# uncertain part is compile time (step 2): if the warm-up is cut, the later steps compile what
# is missing inside their own timeouts, and the extras of step 5 are the first to be cut.
set -uo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:?usage: run_gpu.sh OUT_DIR [DATA_ROOT]}")
data=${2:-}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
BUDGET_S=${BUDGET_S:-460}
start=$(date +%s)

log() { echo "[$(($(date +%s) - start))s] $*" | tee -a "$out/progress.log"; }

# run_step NAME SECONDS RESERVE CMD...: run CMD under a timeout of SECONDS, shortened so that
# RESERVE seconds of the global budget stay for the later steps; output in OUT_DIR/NAME.txt.
run_step() {
    local name=$1 want=$2 reserve=$3
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
}

log "run_gpu.sh -> $out"

# 1. Environment.
{
    echo "date $(date -u +%FT%TZ)"
    echo "git $(git rev-parse HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>&1
    python - <<'PY'
import torch, triton, spafl
print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "spafl", spafl.__version__)
PY
} >"$out/environment.txt" 2>&1
log "environment: $(grep -m1 '^device' "$out/environment.txt")"

# 2. Compile warm-up and native tests, in parallel (compiles are CPU work; the GPU work is small).
# Jobs: "kernels SUITE CASE [ENV]" runs one benchmark case once; "layer MODEL INDEX" runs the
# forward and backward of one threshold layer of an e2e model on its real input (one job per
# distinct layer shape). The ResNet-18 cases at batch 256 share the kernels of batch 64.
python - >"$out/warmup_jobs.txt" 2>"$out/warmup_jobs.err" <<'PY'
import sys
sys.path.insert(0, "benchmarks")
from kernels import SUITES
for suite in ("large", "federated", "resnet18"):
    for case in SUITES[suite]:
        if not case.name.endswith("-b256"):
            print("kernels", suite, case.name, "-")
large = SUITES["large"][0].name
print("kernels large", large, "SPAFL_AUTOTUNE=1")
print("kernels large", large, "SPAFL_COMPACT_WEIGHT=always")
import torch
from e2e import MODELS
from spafl import threshold_layers
from spafl.federated.models import build_model
for name in ("lenet5", "conv4", "resnet18", "vit"):
    seen = set()
    for index, layer in enumerate(threshold_layers(build_model(name, 10))):
        key = (type(layer).__name__, tuple(layer.weight.shape), getattr(layer, "stride", None),
               getattr(layer, "padding", None))
        if key not in seen:
            seen.add(key)
            print("layer", name, index, "-")
PY
warm() {
    local kind=$1 a=$2 b=$3 env=$4
    [[ $env == - ]] && env=SPAFL_AUTOTUNE=0
    if [[ $kind == kernels ]]; then
        env SPAFL_AUTOTUNE=0 "$env" python benchmarks/kernels.py --suite "$a" --cases "$b" --dtypes bfloat16 --densities 0.5 \
            --ops fwd+bwd --providers dense spafl-exact spafl-skip --reps 1
    else
        env SPAFL_AUTOTUNE=0 python - "$a" "$b" <<'PY'
import sys
import torch
sys.path.insert(0, "benchmarks")
from e2e import MODELS, set_density
from spafl import threshold_layers
from spafl.federated.models import build_model
name, index = sys.argv[1], int(sys.argv[2])
shape, batch = MODELS[name]
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as e2e.py
model = build_model(name, 10, backend="reference", collapse_density=None).cuda()
set_density(model, 0.5)
layer = list(threshold_layers(model))[index]
inputs = []
hook = layer.register_forward_hook(lambda mod, args, out: inputs.append(args[0].detach()))
model.train()(torch.randn(batch, *shape, device="cuda"))
hook.remove()
layer.backend = "auto"
x = inputs[0].clone().requires_grad_()
layer(x).float().square().mean().backward()
torch.cuda.synchronize()
PY
    fi
}
export -f warm
timeout 150 xargs -P 10 -L 1 bash -c 'warm "$@" >/dev/null 2>&1 || echo "warm-up failed: $*"' _ \
    <"$out/warmup_jobs.txt" >"$out/warmup.txt" 2>&1 &
warm_pid=$!
# Four test processes, split by the shapes they compile (each shape is a compile of every kernel;
# the autotuning test compiles every candidate configuration).
test_groups=("not conv and not autotuned" "conv and (64x64 or offsets or tf32 or never_synchronises)"
             "conv and not (64x64 or offsets or tf32 or never_synchronises)" "autotuned")
(
    export SPAFL_GPU_QUICK=1 SPAFL_AUTOTUNE=0
    for i in 0 1 2 3; do
        timeout 150 python -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "${test_groups[$i]}" \
            >"$out/tests_$i.log" 2>&1 &
    done
    wait
) &
tests_pid=$!
log "start warm-up ($(wc -l <"$out/warmup_jobs.txt") jobs, 10 processes) and native tests (4 processes), timeout 150s"
wait "$warm_pid"
log "end   warm-up: $(grep -c 'failed' "$out/warmup.txt") failed jobs"
wait "$tests_pid"
cat "$out"/tests_[0-3].log >"$out/tests.log"
log "end   tests: $(for i in 0 1 2 3; do tail -n1 "$out/tests_$i.log"; done | paste -sd ';')"

# 3. Kernel benchmarks, fixed configurations.
suite_args=(--dtypes bfloat16 --densities 1 0.5 0.1 --ops fwd fwd+bwd --reps 3)
run_step kernels_large 40 190 env SPAFL_AUTOTUNE=0 python benchmarks/kernels.py --suite large "${suite_args[@]}" \
    --csv "$out/kernels.csv"
run_step kernels_federated 40 150 env SPAFL_AUTOTUNE=0 python benchmarks/kernels.py --suite federated \
    "${suite_args[@]}" --csv "$out/kernels.csv"
run_step kernels_resnet18 90 60 env SPAFL_AUTOTUNE=0 python benchmarks/kernels.py --suite resnet18 \
    "${suite_args[@]}" --csv "$out/kernels.csv"

# 4. End-to-end training steps.
e2e_args=(--tables step --models lenet5 conv4 resnet18 vit --densities 1 0.5 0.1 --reps 3 --csv "$out/e2e.csv")
[[ -n $data ]] && e2e_args+=(--data-root "$data")
run_step e2e 60 20 env SPAFL_AUTOTUNE=0 python benchmarks/e2e.py "${e2e_args[@]}"

# 5. The large Linear case with autotuning, then with the compacted-weight path.
large=$(awk '$2 == "large" {print $3; exit}' "$out/warmup_jobs.txt")
run_step kernels_tuned 30 20 env SPAFL_AUTOTUNE=1 python benchmarks/kernels.py --suite large --cases "$large" \
    "${suite_args[@]}" --providers dense smaller spafl-skip --csv "$out/kernels_tuned.csv"
run_step kernels_compact 30 20 env SPAFL_AUTOTUNE=0 SPAFL_COMPACT_WEIGHT=always python benchmarks/kernels.py \
    --suite large --cases "$large" "${suite_args[@]}" --providers dense smaller spafl-skip \
    --csv "$out/kernels_compact.csv"

# 6. Summary and plots from whatever was measured.
report() {
    local out=$1 args=()
    [[ -s $out/kernels.csv ]] && args+=(--kernels "$out/kernels.csv")
    [[ -s $out/e2e.csv ]] && args+=(--e2e "$out/e2e.csv")
    ((${#args[@]})) || return 0
    python benchmarks/summary.py "${args[@]}" >"$out/summary.md"
    for csv in "$out/kernels.csv" "$out/e2e.csv"; do
        if [[ -s $csv ]]; then python benchmarks/plot.py "$csv" --out "$out/plots"; fi
    done
}
export -f report
run_step report 20 0 bash -c 'report "$0"' "$out"
log "done: $(($(wc -l <"$out/kernels.csv" 2>/dev/null || echo 1) - 1)) kernel rows," \
    "$(($(wc -l <"$out/e2e.csv" 2>/dev/null || echo 1) - 1)) e2e rows"
