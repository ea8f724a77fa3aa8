#!/usr/bin/env bash
# The whole test suite: sets up .venv (and promtool and prometheus), lints and type-checks, then
# runs pytest. The tests start their own servers (moto, rclone serve s3, prometheus) on 127.0.0.1
# and stop them. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/bootstrap.sh --tests
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
