#!/usr/bin/env bash
# README command 2: set up the venv (if needed) and run the whole test suite (slow tests included;
# GPU tests skip themselves without CUDA). Extra arguments go to pytest, e.g. `-m "not slow"`.
# The suite runs on LDM_TEST_WORKERS pytest-xdist workers (default 2, one thread each; `-n 0` in the extra
# arguments runs it in one process); tests of one xdist_group (the Slurm ones) share a worker.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
exec python -m pytest -ra --durations=40 -n "${LDM_TEST_WORKERS:-2}" --dist loadgroup "$@"
