#!/usr/bin/env bash
# Refresh constraints.txt: the exact versions of every dependency (but torch) that the README's
# install resolves today, inside the ranges of pyproject.toml; then requirements.txt from it.
#
#     bash tools/refresh-constraints.sh        # then: python -m pytest -q, and commit if green
#
# It installs into a new virtual environment (nothing of the current one leaks in), without
# the old constraints, so it picks the newest releases the ranges admit. torch is left out:
# the install command names it (the CPU build torch==2.13.0 here; a GPU machine brings its own
# CUDA build), and a pin here would replace a user's CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(mktemp -d)/venv"
python3 -m venv "$venv"
"$venv/bin/pip" install -q torch==2.13.0
"$venv/bin/pip" install -q -e ".[dev]"
{
    echo "# The exact versions CI tested (all but torch, which the install command names)."
    echo "# Used by the README's install and by .ci/run:  pip install -e \".[dev]\" -c constraints.txt"
    echo "# Refresh with: bash tools/refresh-constraints.sh (then run the tests before committing)."
    echo "# Generated $(date -u +%Y-%m-%d) with Python $("$venv/bin/python" -c 'import platform; print(platform.python_version())')."
    "$venv/bin/pip" freeze --exclude-editable | grep -viE '^(torch|atelier)=='
} > constraints.txt
# requirements.txt (what a Hugging Face Space installs): the same pins, runtime packages only,
# read off the dependency graph of the environment that was just resolved.
"$venv/bin/python" tools/write_requirements.py
rm -rf "$(dirname "$venv")"
echo "constraints.txt: $(grep -vc '^#' constraints.txt) pins"
