#!/usr/bin/env bash
# Creates build/venv with the pinned Python tooling of examples/tinyllm (training, reference
# logits, tokenizing for a user's own model). The C++ build and tests never need it.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
venv="${1:-$root/build/venv}"
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet -r "$root/examples/tinyllm/requirements.txt"
echo "venv ready: $venv"
