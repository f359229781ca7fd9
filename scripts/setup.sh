#!/usr/bin/env bash
# Shared set-up of scripts/quickstart.sh and scripts/test.sh (sourced, not run): make a virtual
# environment if there is none, activate it, and install the project into it with the given extras.
#
#   CAPSSPEC_VENV   where the environment lives (default: .venv in the repository)
#   PYTHON          the interpreter to build it from (default: python3; 3.10 or newer)

capsspec_setup() {
    local extras="$1"; shift
    local python="${PYTHON:-python3}"
    local venv="${CAPSSPEC_VENV:-.venv}"
    if ! command -v "$python" >/dev/null 2>&1; then
        echo "capsspec: $python is not on PATH: install Python 3.10 or newer, or set PYTHON=/path/to/python3" >&2
        return 2
    fi
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
        echo "capsspec: $python is $("$python" -V 2>&1); capsspec needs 3.10 or newer (set PYTHON=...)" >&2
        return 2
    fi
    if [ ! -x "$venv/bin/python" ]; then
        echo "capsspec: creating a virtual environment in $venv" >&2
        if ! "$python" -m venv "$venv"; then
            echo "capsspec: '$python -m venv' failed; on Debian or Ubuntu: sudo apt install python3-venv" >&2
            return 2
        fi
    fi
    # shellcheck disable=SC1091
    . "$venv/bin/activate"
    python -m pip install -q --upgrade pip
    # Framework builds first, pinned, so that the extras below install nothing larger.
    if [ "$#" -gt 0 ]; then
        python -m pip install -q "$@"
    fi
    python -m pip install -q -e ".[$extras]"
}
