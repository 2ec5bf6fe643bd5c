#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one run sized for a short lease (about 8 minutes on an H100),
# most important first, so that a lease cut short still leaves the figures that matter:
#   1. the Triton kernels alone, then the ghost-BN layer table (ghost / BN, eager, ops and compiled;
#      contiguous and channels_last; float32 and bfloat16), each printed with GPU/CUDA/torch/triton;
#   2. the CUDA tests (Triton and ops backends), then the CPU ghost-BN tests built with that
#      machine's compiler (Triton ones through the interpreter are skipped there: CUDA runs them);
#   3. the training-step and DDP benchmarks.
# Uses the machine's own python3/torch/triton with src/ on PYTHONPATH (no venv, no network); a wheel
# directory .whl/ (e.g. tomli-w, hypothesis) is installed to /tmp/site first when present.
#
#   bash benchmarks/gpu_check.sh [OUTDIR]        # logs to OUTDIR (default: $OUT or gpu-check/)
#
# Results go to benchmarks/RESULTS.md by hand, with the machine and versions it prints.
set -uo pipefail
out=${1:-${OUT:-gpu-check}}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $out/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $*"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log" | tail -n 40
    echo "=== $name: exit ${PIPESTATUS[0]}"
}

{ nvidia-smi -L; python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
  python3 -c 'import triton; print("triton", triton.__version__)' || echo "no triton"
  python3 -c 'import bigbatch.layers as l, torch; print("backend:", l.backend_summary("cuda"))'
  grep -m1 "model name" /proc/cpuinfo; nproc; cc --version | head -1; } 2>&1 | tee "$out/machine.log"
step ghost_bn 150 python3 benchmarks/ghost_bn.py --device cuda --kernels --repeats 21
step tests_cuda 150 python3 -m pytest -q -p no:cacheprovider -x -o addopts="" \
    tests/test_ghost_bn_cuda.py tests/test_ghost_bn_triton.py tests/test_ghost_bn_backend.py
step tests_cpu 120 python3 -m pytest -q -p no:cacheprovider -o addopts="" \
    tests/test_ghost_bn.py tests/test_ghost_bn_kernel.py tests/test_train_loop.py \
    -k "cuda or gpu or ghost or kernel or reference"
step train_step 120 python3 benchmarks/train_step.py --device cuda --repeats 10
step ddp_step 90 python3 benchmarks/ddp_step.py --repeats 10
