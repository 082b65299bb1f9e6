#!/usr/bin/env bash
# Set up a fresh Debian machine for pykvm's tests (scripts/setup.sh test) and run them.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec python3 -m pytest "$@"
