#!/usr/bin/env bash
# README command 2: set up the venv (if needed) and run the whole test suite (slow tests included;
# GPU tests skip themselves without CUDA). Extra arguments go to pytest, e.g. `-m "not slow"`.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
exec python -m pytest -ra --durations=40 "$@"
