#!/usr/bin/env bash
# openstack-venvs.sh [SERVICE...] — the real OpenStack services the tests run against, each in
# its own virtual environment with pinned versions, installed once into a cache directory
# outside the repository ($TEST_REBUILDD_CACHE, default /var/cache/rebuildd-test):
#   keystone -> $TEST_REBUILDD_CACHE/keystone-30.0.0 (keystone, gunicorn)
#   glance   -> $TEST_REBUILDD_CACHE/glance-33.0.0 (glance, gunicorn)
#   cinder   -> $TEST_REBUILDD_CACHE/cinder-29.0.0 (cinder, and fixtures, which cinder imports
#               at run time without requiring it; served in-process, so no gunicorn)
# Without arguments: all of them. Idempotent: a venv whose marker names the same pins is kept
# (a fast no-op); a half-installed one is removed and installed again. The tests find a venv
# through the same path (tests/keystone.py, tests/glance.py), so the pins live here and there
# only.
set -euo pipefail

cache="${TEST_REBUILDD_CACHE:-/var/cache/rebuildd-test}"
python="${PYTHON:-python3}"

declare -A pins=(
  [keystone]="keystone==30.0.0 gunicorn==27.0.1"
  [glance]="glance==33.0.0 gunicorn==27.0.1"
  [cinder]="cinder==29.0.0 fixtures==4.3.2"
)
declare -A dirs=(
  [keystone]="keystone-30.0.0"
  [glance]="glance-33.0.0"
  [cinder]="cinder-29.0.0"
)

services=("$@")
((${#services[@]})) || services=("${!pins[@]}")

for service in "${services[@]}"; do
  [[ -n "${pins[$service]:-}" ]] || { echo "openstack-venvs: unknown service $service" >&2; exit 2; }
  venv="$cache/${dirs[$service]}"
  marker="$venv/.installed"
  if [[ -f "$marker" && "$(cat "$marker")" == "${pins[$service]}" ]]; then
    echo "openstack-venvs: $service present ($venv)"
    continue
  fi
  echo "openstack-venvs: installing ${pins[$service]} into $venv"
  rm -rf "$venv"
  mkdir -p "$cache"
  "$python" -m venv "$venv"
  # shellcheck disable=SC2086  # the pins are words
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check ${pins[$service]}
  echo "${pins[$service]}" >"$marker"
done
