#!/usr/bin/env bash
# Creates (once) the venv the SDK tests run in: the official openai and
# anthropic Python packages from PyPI, pinned in requirements.txt.
# Idempotent: does nothing when the venv already holds those pins.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${ABGATE_SDK_VENV:-$here/../../target/sdk-venv}"
stamp="$venv/.requirements"
if [ -x "$venv/bin/python" ] && cmp -s "$here/requirements.txt" "$stamp"; then
  exit 0
fi
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$here/requirements.txt"
cp "$here/requirements.txt" "$stamp"
echo "sdk venv ready: $venv"
