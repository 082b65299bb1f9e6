#!/usr/bin/env bash
# Set up a fresh Debian machine for pykvm's tests (scripts/setup.sh test) and run them with the
# repository's virtual environment, where setup put pykvm and the test extras.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec .venv/bin/python -m pytest "$@"
