#!/usr/bin/env bash
# The GPU check of issue 20 in ONE device call: the GPU backend's tests (its kernel tests and the `gpu` tier), then benchmarks/gpu_bench.py (the
# Qwen3.5-35B-A3B geometry, random bf16 weights built on the device). Fails soft: the bench runs even when tests
# fail; the exit status is non-zero when either failed.
#
# On a lent H200 (python3 there has torch and triton, not fla-core or transformers 5.23: they travel as wheels in
# the ignored folder .whl). Once, here, in the repository root:
#     echo /.whl/ >> .git/info/exclude
#     mkdir -p .whl && cp /tmp/whl/fla_core-0.6.0-py3-none-any.whl /tmp/whl/einops-0.8.2-py3-none-any.whl .whl/
#     python3 -m pip download --no-deps --only-binary=:all: -d .whl transformers==5.23.0
# (fla-core and einops are pure Python: `pip download --no-deps -d .whl fla-core==0.6.0 einops==0.8.2` if /tmp/whl
# is gone; transformers 5.23's own needs, huggingface-hub >= 1.31, tokenizers 0.23, safetensors 0.8, are there.)
# Then the device tool's call:
#     run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)
# What comes back under files_at: env.txt, gpu-tests.log, gpu-bench.log, gpu-bench.json.
#
# Here, without a GPU, to check this script: bash scripts/gpu_check.sh --dry-run
# (no wheels; PYTHON, default python3, must have torch; the `gpu` tests skip; the bench runs --geometry tiny
# --device cpu; OUT, default a new temporary folder, receives the same files.)
set -u -o pipefail

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
TESTS_S=${GPU_CHECK_TESTS_S:-230}  # the tests' share of the call's 540 s, then the bench's
BENCH_S=${GPU_CHECK_BENCH_S:-270}

if [ $DRY = 0 ]; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            || echo "gpu_check: installing the carried wheels failed" >&2
    else
        echo "gpu_check: no .whl folder carried: fla-core and transformers 5.23 are missing" >&2
    fi
    export PYTHONPATH=/tmp/site:$PWD
    BENCH_ARGS=()
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    BENCH_ARGS=(--geometry tiny --device cpu)
fi

{
    date -u
    git log -1 --oneline 2>/dev/null
    nvidia-smi 2>&1 || echo "(no nvidia-smi)"
    "$PY" - <<'EOF'
import importlib.metadata as md
import torch
for pkg in ("torch", "triton", "fla-core", "einops", "transformers"):
    try:
        print(f"{pkg} {md.version(pkg)}")
    except md.PackageNotFoundError:
        print(f"{pkg} (not installed)")
print("cuda", torch.version.cuda, "available:", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
} 2>&1 | tee "$OUT/env.txt"

# The GPU backend's test files, whole (their kernel tests run on CUDA tensors where CUDA is) and the `gpu` tier:
# only these are collected, so a package missing there for other test files cannot stop them.
mapfile -t FILES < <(ls tests/backends/test_gpu_*.py tests/gpu/test_*.py 2>/dev/null)
TIMEOUT_ARGS=()
"$PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT_ARGS=(--timeout 200)
if [ ${#FILES[@]} = 0 ]; then
    echo "gpu_check: no GPU test file found" | tee "$OUT/gpu-tests.log"
    TESTS_RC=1
else
    timeout "$TESTS_S" "$PY" -m pytest -q -m "gpu or not slow" -p no:cacheprovider "${TIMEOUT_ARGS[@]}" "${FILES[@]}" 2>&1 \
        | tee "$OUT/gpu-tests.log"
    TESTS_RC=$?
fi

timeout "$BENCH_S" "$PY" benchmarks/gpu_bench.py "${BENCH_ARGS[@]}" --out "$OUT/gpu-bench.json" 2>&1 \
    | tee "$OUT/gpu-bench.log"
BENCH_RC=$?

echo "gpu_check: tests exit $TESTS_RC, bench exit $BENCH_RC (124: stopped by its timeout); results in $OUT"
[ $TESTS_RC = 0 ] && [ $BENCH_RC = 0 ]
