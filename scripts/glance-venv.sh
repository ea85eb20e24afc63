#!/usr/bin/env bash
# glance-venv.sh — the real Glance the tests run against (tests/glance.py), in its own virtual
# environment with pinned versions, installed once into a cache directory outside the
# repository ($REBUILDD_TEST_CACHE, default /var/cache/rebuildd-test):
#   glance -> $REBUILDD_TEST_CACHE/glance-33.0.0 (glance, gunicorn)
# Idempotent: a venv whose marker names the same pins is kept (a fast no-op); a half-installed
# one is removed and installed again. Same layout and marker as scripts/openstack-venvs.sh (on
# the keystone branch), so this becomes one more entry of its table when both are in main.
set -euo pipefail

cache="${REBUILDD_TEST_CACHE:-/var/cache/rebuildd-test}"
python="${PYTHON:-python3}"
pins="glance==33.0.0 gunicorn==27.0.1"
venv="$cache/glance-33.0.0"  # tests/glance.py looks here
marker="$venv/.installed"

if [[ -f "$marker" && "$(cat "$marker")" == "$pins" ]]; then
  echo "glance-venv: glance present ($venv)"
  exit 0
fi
echo "glance-venv: installing $pins into $venv"
rm -rf "$venv"
mkdir -p "$cache"
"$python" -m venv "$venv"
# shellcheck disable=SC2086  # the pins are words
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check $pins
echo "$pins" >"$marker"
