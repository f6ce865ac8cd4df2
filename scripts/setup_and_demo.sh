#!/usr/bin/env bash
# README command 1: set up the venv (if needed) and run the main job — the MNIST demo, both stages.
# Extra arguments go to `ldm-lightning demo` (see `ldm-lightning demo --help`).
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
exec ldm-lightning demo "$@"
