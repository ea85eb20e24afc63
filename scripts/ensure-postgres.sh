#!/usr/bin/env bash
# ensure-postgres.sh — make sure a PostgreSQL answers on 127.0.0.1:5432 with trust auth for
# user `postgres` (no systemd needed). If something already answers, do nothing. Otherwise
# install Debian's `postgresql` (15 on Debian 12), prepend `host all all 127.0.0.1/32 trust`
# to pg_hba.conf, start the `main` cluster with pg_ctlcluster and wait until it is ready.
# Prints the SQLAlchemy URL to use.
set -euo pipefail

HOST=127.0.0.1 PORT=5432
URL="postgresql+asyncpg://postgres@$HOST:$PORT/postgres"

ready() {
  if command -v pg_isready >/dev/null; then
    pg_isready -q -h "$HOST" -p "$PORT"
  else
    (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null
  fi
}

if ! ready; then
  if [[ "$(dpkg-query -W -f='${Status}' postgresql 2>/dev/null || true)" != "install ok installed" ]]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends postgresql
  fi
  ver="$(ls /etc/postgresql | sort -V | tail -n 1)"
  [[ -n "$ver" ]] || { echo "ensure-postgres: no cluster under /etc/postgresql" >&2; exit 1; }
  [[ -d "/etc/postgresql/$ver/main" ]] || pg_createcluster "$ver" main
  hba="/etc/postgresql/$ver/main/pg_hba.conf"
  if ! grep -qE '^host[[:space:]]+all[[:space:]]+all[[:space:]]+127\.0\.0\.1/32[[:space:]]+trust' "$hba"; then
    sed -i '1i host all all 127.0.0.1/32 trust' "$hba"
  fi
  # start, or restart if running but not answering on TCP (e.g. after the hba edit)
  pg_ctlcluster --skip-systemctl-redirect "$ver" main restart
  for ((i = 0; i < 150; i++)); do ready && break; sleep 0.2; done
  ready || { echo "ensure-postgres: PostgreSQL $ver not ready on $HOST:$PORT after 30s" >&2; exit 1; }
  echo "ensure-postgres: started PostgreSQL $ver"
fi
! command -v psql >/dev/null || psql -h "$HOST" -p "$PORT" -U postgres -d postgres -Atqc 'select 1' >/dev/null ||
  { echo "ensure-postgres: $HOST:$PORT answers but user postgres cannot log in without password" >&2; exit 1; }
echo "$URL"
