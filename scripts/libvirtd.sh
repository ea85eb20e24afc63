#!/usr/bin/env bash
# libvirtd.sh start|stop|status — run a local libvirtd (QEMU driver) without systemd.
#   start:  no-op if qemu:///system already answers; otherwise creates the libvirt-qemu user,
#           makes QEMU run as root with stdio_handler=file (no virtlogd), and launches
#           `setsid tini -s -- libvirtd` (tini = subreaper, so destroyed QEMUs are reaped fast),
#           logging to /var/log/libvirtd.out, pid of tini in /run/rebuildd-libvirtd.pid.
#           Waits (~30 s) until a real call succeeds.
#   stop:   destroys active domains named rebuildd-test-*, then TERMs the tini/libvirtd we started.
#   status: exit 0 if qemu:///system answers.
# Packages: scripts/ensure-packages.sh test. See /work/shared/LIBVIRT.md.
set -euo pipefail

URI=qemu:///system
PIDFILE=/run/rebuildd-libvirtd.pid
LOG=/var/log/libvirtd.out
CONF=/etc/libvirt/qemu.conf
TIMEOUT=30

answers() { virsh -c "$URI" version >/dev/null 2>&1; }  # a real call, not a socket check
alive() { [[ -r "/proc/$1/stat" ]] && [[ "$(cut -d' ' -f3 "/proc/$1/stat")" != Z ]]; }  # zombies count as dead
our_pid() {  # prints the tini pid from the pidfile if that process is still alive
  local pid
  pid="$(cat "$PIDFILE" 2>/dev/null || true)"
  [[ -n "$pid" && "$(cat "/proc/$pid/comm" 2>/dev/null)" == tini ]] && alive "$pid" && echo "$pid"
}

start() {
  if answers; then echo "libvirtd: already running"; return 0; fi
  local cmd
  for cmd in libvirtd tini virsh; do
    command -v "$cmd" >/dev/null || { echo "libvirtd: $cmd missing; run scripts/ensure-packages.sh test" >&2; return 1; }
  done
  local pid
  if ! pid="$(our_pid)"; then
    id libvirt-qemu >/dev/null 2>&1 ||
      useradd --system --user-group --home-dir /var/lib/libvirt --shell /usr/sbin/nologin libvirt-qemu
    mkdir -p /etc/libvirt
    local want=('user = "root"' 'group = "root"' 'stdio_handler = "file"') line
    for line in "${want[@]}"; do
      if ! grep -qxF "$line" "$CONF" 2>/dev/null; then
        touch "$CONF"
        sed -i "/^[[:space:]]*${line%% *}[[:space:]]*=/d" "$CONF"   # drop a conflicting setting
        echo "$line" >>"$CONF"
      fi
    done
    setsid tini -s -- libvirtd </dev/null >"$LOG" 2>&1 &
    pid=$!
    echo "$pid" >"$PIDFILE"
  fi
  local deadline=$((SECONDS + TIMEOUT))
  until answers; do
    if ! alive "$pid"; then
      echo "libvirtd: daemon exited during startup; tail of $LOG:" >&2; tail -n 20 "$LOG" >&2; return 1
    fi
    if ((SECONDS >= deadline)); then
      echo "libvirtd: $URI not answering after ${TIMEOUT}s (pid $pid); tail of $LOG:" >&2
      tail -n 20 "$LOG" >&2; return 1
    fi
    sleep 0.2
  done
  echo "libvirtd: started (tini pid $pid, log $LOG)"
}

stop() {
  if answers; then
    local dom
    for dom in $(virsh -c "$URI" list --name | grep '^rebuildd-test-' || true); do
      virsh -c "$URI" destroy "$dom" >/dev/null && echo "libvirtd: destroyed $dom"
    done
  fi
  local pid
  if ! pid="$(our_pid)"; then
    rm -f "$PIDFILE"; echo "libvirtd: no libvirtd started by this script is running"; return 0
  fi
  kill -TERM "$pid"
  local i
  for ((i = 0; i < 100; i++)); do alive "$pid" || break; sleep 0.1; done
  alive "$pid" && { echo "libvirtd: still alive after 10s, sending KILL" >&2; kill -KILL -- "-$pid" || true; }
  rm -f "$PIDFILE"
  echo "libvirtd: stopped (tini pid $pid)"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) if answers; then echo "libvirtd: running"; else echo "libvirtd: not running"; exit 1; fi ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
