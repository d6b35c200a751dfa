#!/usr/bin/env bash
# The test command: installs what the tests need (Debian's docker-registry, pydlit with its test
# extras) and runs every test. Safe to run again; arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v docker-registry >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq docker-registry >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check -e ".[test]"
exec python3 -m pytest -q "$@"
