#!/usr/bin/env bash
# The tests on a fresh machine: set up (the CPU builds of torch and TensorFlow, the project with
# its test and docs extras), then the test suite, the documentation site built in strict mode (a
# broken link or a page missing from mkdocs.yml's nav fails), and the conformance suite against
# every backend that runs here. This is what CI runs (.ci/run calls it).
#
#   scripts/test.sh                  (or: make test)
#
# Extra arguments go to pytest (e.g. scripts/test.sh -x -k cli; the docs build and the conformance
# suite then do not run). CAPSSPEC_VENV and PYTHON choose the environment (see scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
# TensorFlow 2.21's oneDNN kernels corrupt the heap in rank-4 matmuls (backends/tensorflow/__init__.py);
# the backend turns them off itself, and this covers every process the tests start.
export TF_ENABLE_ONEDNN_OPTS="${TF_ENABLE_ONEDNN_OPTS:-0}"
start=$(date +%s)
. scripts/setup.sh
capsspec_setup "test,torch,tensorflow,onnx,jax,docs" "torch==2.13.0" "tensorflow-cpu==2.21.*" "cupy-cuda12x" "jax==0.10.2"
echo "setup took $(( $(date +%s) - start )) s"
capsspec backends
# Each command on its own line: under `set -e` a failure in an `a && b` list does not stop the
# script, so `pytest && conformance` would let a failed pytest end in exit status 0.
if [ "$#" -gt 0 ]; then
    python -m pytest "$@"
else
    # The conformance suite runs beside the tests, two backends' suites at a time, its output kept
    # and printed after them: one suite keeps about one core busy (Python between small kernels,
    # tracing, compiling) and so does much of pytest, so together they use both cores of a 2-core
    # CI machine instead of one after another.
    work="$(mktemp -d)"
    capsspec conformance --backend all --jobs 2 > "$work/conformance.log" 2>&1 &
    conformance_pid=$!
    trap 'kill "$conformance_pid" 2>/dev/null || true; rm -rf "$work"' EXIT
    failed=""
    python -m pytest -q --durations=15 || failed="$failed pytest"  # the slowest tests: where CI time goes
    # The site goes to a temporary folder: the build is a check here, nothing to keep.
    NO_MKDOCS_2_WARNING=1 python -m mkdocs build --strict --quiet --site-dir "$work/site" || failed="$failed docs"
    echo "waiting for the conformance suite (started with the tests)"
    wait "$conformance_pid" || failed="$failed conformance"
    cat "$work/conformance.log"
    if [ -n "$failed" ]; then
        echo "scripts/test.sh: failed:$failed" >&2
        exit 1
    fi
fi
echo "tests took $(( $(date +%s) - start )) s"
