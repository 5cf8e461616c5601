#!/usr/bin/env bash
# Everything a CUDA GPU is needed for, in one go: build the CUDA extension in place, run the GPU tests, then the
# GPU benchmarks. Logs and figures go to OUTDIR (default gpu_out). Uses the python3 that has a CUDA torch; the
# test and benchmark packages must be installed there (pytest, hypothesis, transformers).
#
#     bash benchmarks/gpu_session.sh [OUTDIR]
#
# Then: OUTDIR/bench_cuda.md goes into benchmarks/RESULTS.md's GPU section, and OUTDIR/op_times.json to
# benchmarks/results/op_times.json, from which `python benchmarks/bench_distributed.py --predict-70b --write`
# predicts LLaMA-2-70B on 8 and 16 GPUs.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
step() { echo "== $1 ($(date +%T))"; }

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
    | tee -a "$out/gpu.txt"

step "build (CUDA kernels included)"
if ! ADMM_SPARSE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} python3 setup.py build_ext --inplace >"$out/build.log" 2>&1; then
    tail -40 "$out/build.log"
    echo "BUILD FAILED"
    exit 1
fi
python3 -c "import torch, admm_sparse; assert torch._C._dispatch_has_kernel_for_dispatch_key('admm_sparse::admm_prune', 'CUDA'), 'no CUDA kernels'; print('extension loaded with CUDA kernels')" || exit 1

step "GPU tests"
# The CPU-emulated backend of test_cuda.py is the CPU suite's; here only the real card.
timeout ${TEST_SECONDS:-240} python3 -m pytest -q -p no:cacheprovider --no-header -rs \
    tests/test_cuda.py -k "not emulated" tests/test_device.py tests/test_bench_cuda.py 2>&1 | tee "$out/tests.log" | tail -25

step "bench_cuda"
timeout ${BENCH_SECONDS:-150} python3 benchmarks/bench_cuda.py --repeats 5 2>&1 | tee "$out/bench_cuda.md"

step "bench_op_times"
timeout ${BENCH_SECONDS:-150} python3 benchmarks/bench_op_times.py --device cuda --repeats 2 --write 2>&1 \
    | tee "$out/op_times.md"
cp benchmarks/results/op_times.json "$out/" 2>/dev/null
step "done"
