#!/usr/bin/env bash
# The CUDA paths a CPU machine cannot run, as one prepared script for a session lent a GPU (the
# device tool; about 10 minutes on an H100):
#
#   bash benchmarks/device_check.sh                       # writes its logs and tables under $OUT
#   DEVICE=cpu SIDES=16 RADII=4 bash benchmarks/device_check.sh   # a dry run of the script itself
#
# The device machine has torch and Triton but not diffusers, so only what needs neither runs here:
# the CLEAR attention kernels (compiled flex in tile and row order, tiled, full SDPA) at FLUX's
# token grids for 1K-8K px (sides 64-512, FLUX.1's 24 heads of 128, bf16), and the CUDA-only tests
# (flex backward, query-row bands, compiled flex over several images: the Kontext path). Multi-process
# NCCL (patch-parallel, FSDP2) needs a machine of several GPUs; these machines have one. Each step runs
# under its own timeout and the script goes on after a failure, so one call returns everything it
# could measure.
set -u
OUT="${OUT:-device-check}"
DEVICE="${DEVICE:-cuda}"
SIDES="${SIDES:-64 128 256 512}"
RADII="${RADII:-8 16}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD/tests" PYTHONDONTWRITEBYTECODE=1

step() {  # step NAME SECONDS COMMAND...: run it, its output to $OUT/NAME.txt and the log
    local name=$1 seconds=$2
    shift 2
    echo "== $name"
    timeout "$seconds" "$@" >"$OUT/$name.txt" 2>&1
    echo "-- $name: exit $?"
    tail -n 25 "$OUT/$name.txt"
}

step environment 60 python -c "
import importlib.util, platform, torch
print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda)
print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')
print({name: importlib.util.find_spec(name) is not None
       for name in ('triton', 'pytest', 'diffusers', 'accelerate', 'safetensors', 'matplotlib')})"

step cuda-tests 300 python -m pytest -q -rs -p no:cacheprovider tests/mixers/test_clear.py tests/mixers/test_positions.py \
    tests/mixers/test_query_rows.py

# shellcheck disable=SC2086  # the lists are meant to split into arguments
step attention 420 python benchmarks/attention.py --device "$DEVICE" --dtype bfloat16 --heads 24 --head-dim 128 \
    --sides $SIDES --radii $RADII --methods full clear --repeats 3 --out "$OUT" --name "attention-$DEVICE-flux"
