#!/usr/bin/env bash
# The GPU checks, in one call on a CUDA machine (see benchmarks/README.md): the test
# suite's GPU cases (CuPy kernels, torch on CUDA, JAX on the GPU) against the core,
# then the benchmark's GPU cases. Run from the repository root, with the wheels that
# machine lacks in .whl/ (array-api-compat, array-api-strict). Writes to $OUT (or
# benchmarks/results/gpu).
#   bash benchmarks/gpu.sh [tests|bench|profile|ab|all|setup] [bench or gpu_ab.py args...]
# (setup: only the wheels and the C kernels, for commands run after it)
set -uo pipefail
what=${1:-all}
shift || true
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # several test processes share the GPU
# the optional C kernels, in place (what `pip install -e .` builds; tests/backends/test_native.py)
python3 setup.py -q build_ext --inplace >/dev/null 2>&1 || echo "C kernels not built"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
python3 - <<'EOF'
import cupy, jax, numpy, torch
print("torch", torch.__version__, torch.cuda.get_device_name(0), "| jax", jax.__version__,
      jax.default_backend(), "| cupy", cupy.__version__, "| numpy", numpy.__version__)
EOF
rc=0
if [[ $what == tests || $what == all ]]; then
    python3 -m pytest -q -p no:cacheprovider -n 8 --maxfail=40 --timeout 300 \
        tests/test_gpu.py tests/backends tests/test_clipping.py tests/test_norms.py \
        tests/test_numpy_inplace.py tests/test_torch.py tests/test_optax.py \
        tests/test_jax_transforms.py tests/test_unitwise.py tests/test_per_example.py \
        tests/test_clippers.py tests/test_parity.py tests/test_properties.py \
        -k "not opacus" 2>&1 | tee "$OUT/tests.log" | tail -40
    rc=${PIPESTATUS[0]}
fi
if [[ $what == profile || $what == all ]]; then
    python3 benchmarks/gpu_profile.py 2>&1 | tee "$OUT/profile.log"
    rc=$((rc | PIPESTATUS[0]))
fi
if [[ $what == ab || $what == all ]]; then
    ab_args=()  # gpu.sh ab [--pause S] [--series] [--profile]: gpu_ab.py's options
    [[ $what == ab ]] && ab_args=("$@")
    python3 benchmarks/gpu_ab.py ${ab_args[@]+"${ab_args[@]}"} 2>&1 | tee "$OUT/ab.log"
    rc=$((rc | PIPESTATUS[0]))
fi
if [[ $what == bench || $what == all ]]; then
    python3 benchmarks/bench.py --libraries cuda,cupy,jax-gpu,step-cuda --no-plot --out "$OUT" "$@" \
        2>&1 | tee "$OUT/bench.log"
    rc=$((rc | PIPESTATUS[0]))
fi
exit $rc
