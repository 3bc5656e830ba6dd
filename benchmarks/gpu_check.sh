#!/usr/bin/env bash
# The GPU checks of issue 12 in one run, for a session that is lent a GPU machine (no session so far
# was): the GPU-marked tests, then benchmarks/estimator.py and benchmarks/speculation.py on CUDA,
# each under its own time limit (560 s in all, under the device tool's 600 s per command), with
# every log written to $OUT (the device tool brings that folder back) or to build/gpu_check.
#
#   bash benchmarks/gpu_check.sh            # at most about 9 minutes; the estimator's CPU run is not repeated
#
# The device image has torch, lightning, torchmetrics, tensorboard, matplotlib, scikit-learn and
# pytest, but not mlxtend (the LeNet's MNIST-5k). Carry it as a wheel (pure Python; its own needs are
# on the image): here, once, `echo /.whl/ >> .git/info/exclude && python3 -m pip download --no-deps
# --only-binary=:all: mlxtend==0.25.0 -d .whl`; then call the device tool's `run` with
# `carry=[".whl"]`. The script installs what it finds under .whl/ into /tmp/site.
#
# Afterwards: put the estimator's table and JSON line in docs/performance.md beside the CPU table,
# with the machine (device.txt), and say which GPU tests passed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-build/gpu_check}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

{
    nvidia-smi -L
    python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(0))'
    nproc
} 2>&1 | tee "$out/device.txt"

# the test files that hold GPU-marked tests (the others need packages the image may lack)
gpu_files=$(grep -l "mark.gpu" tests/test_*.py)
timeout 200 python3 -m pytest -q -rs -p no:cacheprovider -m gpu $gpu_files 2>&1 | tee "$out/gpu_tests.log"
echo "gpu tests: exit ${PIPESTATUS[0]}" | tee -a "$out/gpu_tests.log"
# a GPU test skipped on a GPU machine tested nothing (a missing package, no CUDA): say so loudly
if grep -q "^SKIPPED" "$out/gpu_tests.log"; then
    echo "WARNING: GPU tests were skipped on the GPU machine (reasons above)" | tee -a "$out/gpu_tests.log"
fi

timeout 300 python3 benchmarks/estimator.py --device cuda 2>&1 | tee "$out/estimator_cuda.log"
echo "estimator --device cuda: exit ${PIPESTATUS[0]}" | tee -a "$out/estimator_cuda.log"

# speculative probes (performance.md, speedup_vs_sequential): predicted 1.7x where a pass's time
# hardly depends on its rows; this measures the GPU's own pass costs
timeout 60 python3 benchmarks/speculation.py --device cuda 2>&1 | tee "$out/speculation_cuda.log"
echo "speculation --device cuda: exit ${PIPESTATUS[0]}" | tee -a "$out/speculation_cuda.log"
