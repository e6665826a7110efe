#!/usr/bin/env bash
# The GPU checks, in one go (within about 10 minutes: its steps' time limits add up to 9.5):
# the CUDA tests (real CUDA graphs against eager CUDA training), the throughput benchmark at the lab's size with a 15-member
# pack (CUDA graphs and eager, fp32 and bf16, grouped convolutions and 1x1 ones as GEMMs,
# graphed single runs on streams, peak memory, kernel profiles), a real study on CUDA
# through MLflow with its 15 members packed, and the pack with every dense convolution as a
# GEMM; GPU_CHECK_COMPILE=1 adds torch.compile on the
# single run. Results go to OUT (default ./gpu-check).
#
#     bash scripts/gpu_check.sh [OUT]
#
# Where mlflow and optuna are not installed (a bare CUDA image), wheels in ./.whl are
# installed to a private folder first.
set -uo pipefail
out=${1:-${OUT:-gpu-check}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

if [ -d .whl ] && ! "$python" -c "import mlflow, optuna, pytest" 2>/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
    | tee "$out/gpu.txt"
"$python" -c "import torch; print('torch', torch.__version__, 'cudnn', \
torch.backends.cudnn.version(), 'tf32 conv', torch.backends.cudnn.allow_tf32)" | tee -a "$out/gpu.txt"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" > >(tee "$out/$name.log") 2>&1
    local status=$?
    echo "== $name: exit $status after $((SECONDS - start)) s"
    return $status
}

step cuda_tests 90 "$python" -m pytest -q -p no:cacheprovider -m cuda tests/test_graphs.py
step bench_k15 300 "$python" -m benchmarks.throughput --device cuda --profile full \
    --members 15 --steps 6 --bf16 --kernels --packed-convs grouped,matmul_1x1 --concurrent \
    --out "$out/bench_k15.json"
step study_cuda 90 "$python" -m studies.kl_ablation --profile smoke --seeds 0 1 2 3 4
# Last, so that it cannot crowd out the rows above: every dense convolution as a GEMM
# (3x3 ones through im2col), against cuDNN's grouped kernels that bound the graphed pack.
step bench_k15_matmul 90 "$python" -m benchmarks.throughput --device cuda --profile full \
    --members 15 --steps 4 --packed-convs matmul --out "$out/bench_k15_matmul.json"
if [ -n "${GPU_CHECK_COMPILE:-}" ]; then
    step bench_compile 100 "$python" -m benchmarks.throughput --device cuda --profile full \
        --members 1 --steps 10 --compile --out "$out/bench_compile.json"
fi
