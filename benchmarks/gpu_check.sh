#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one run sized for a short lease (about 6 minutes on an H100):
# the GPU tests, the ghost-BN tests (the CPU kernel built with that machine's compiler), then the
# GPU benchmarks. Uses the machine's own python3/torch with src/ on PYTHONPATH (no venv, no network);
# a wheel directory .whl/ (e.g. tomli-w) is installed to /tmp/site first when present.
#
#   bash benchmarks/gpu_check.sh [OUTDIR]        # logs to OUTDIR (default: $OUT or gpu-check/)
#
# Results go to benchmarks/RESULTS.md by hand, with the machine named.
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
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log" | tail -n 25
    echo "=== $name: exit ${PIPESTATUS[0]}"
}

{ nvidia-smi -L; python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
  grep -m1 "model name" /proc/cpuinfo; nproc; cc --version | head -1; } 2>&1 | tee "$out/machine.log"
step tests 180 python3 -m pytest -q -p no:cacheprovider -x -o addopts="" \
    tests/test_ghost_bn_cuda.py tests/test_ghost_bn.py tests/test_ghost_bn_kernel.py \
    tests/test_train_loop.py -k "cuda or gpu or ghost or kernel or reference"
step ghost_bn 90 python3 benchmarks/ghost_bn.py --repeats 21
step train_step 120 python3 benchmarks/train_step.py --device cuda --repeats 10
step ddp_step 120 python3 benchmarks/ddp_step.py --repeats 10
