#!/usr/bin/env bash
# The whole test suite: sets up .venv, lints and type-checks, then runs pytest. The tests start their own S3
# servers (moto, rclone serve s3) on 127.0.0.1 and stop them. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/bootstrap.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
