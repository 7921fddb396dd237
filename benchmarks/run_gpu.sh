#!/usr/bin/env bash
# Everything the GPU figures need, in one go, on a CUDA machine: the CUDA-only tests, the kernel
# microbenchmarks (every suite, fp32/TF32, fp16, bf16), the end-to-end timings, the plots.
#
#   bash benchmarks/run_gpu.sh OUT_DIR [DATA_ROOT]
#
# Writes OUT_DIR/{tests.log,kernels.csv,e2e.csv,plots/,environment.txt}; commit them as
# benchmarks/results/<device>/.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:?usage: run_gpu.sh OUT_DIR [DATA_ROOT]}")
data=${2:-../shared/data}
mkdir -p "$out"
python - >"$out/environment.txt" <<'PY'
import torch, triton, spafl
print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "spafl", spafl.__version__)
PY
python -m pytest -q tests/test_gpu.py tests/test_kernels_linear.py tests/test_kernels_conv.py 2>&1 | tail -30 >"$out/tests.log"
python benchmarks/kernels.py --suite all --csv "$out/kernels.csv" >"$out/kernels.txt"
python benchmarks/e2e.py --data-root "$data" --csv "$out/e2e.csv" >"$out/e2e.txt"
python benchmarks/plot.py "$out/kernels.csv" --out "$out/plots"
python benchmarks/plot.py "$out/e2e.csv" --out "$out/plots"
echo "results in $out"
