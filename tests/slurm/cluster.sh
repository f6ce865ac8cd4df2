#!/usr/bin/env bash
# A REAL Slurm cluster for the `@pytest.mark.slurm` tests (Debian's slurm 22.05): N emulated nodes n1..nN
# (default 2; LDM_SLURM_NODES), each its own slurmd on 127.0.0.1 with its own port, so a 1-node job and a
# 2-node job (DDP across "nodes", rendezvous on 127.0.0.1) both run on one machine.
#
#   bash tests/slurm/cluster.sh up     # install (if missing) + start munged, slurmctld, slurmd; wait for `idle`
#   eval "$(bash tests/slurm/cluster.sh env)"   # export SLURM_CONF for sinfo/sbatch/squeue
#   bash tests/slurm/cluster.sh down   # stop the daemons this script started (by PID), remove state
#
# Needs root (installs packages, runs slurmd as root). State lives under $LDM_SLURM_DIR
# (default /tmp/ldm-slurm); nothing is written to /etc/slurm. Settings: tests/slurm/slurm.conf.in.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE="${LDM_SLURM_DIR:-/tmp/ldm-slurm}"
CONF="$STATE/slurm.conf"
CPUS="${LDM_SLURM_CPUS:-4}"
NODES="${LDM_SLURM_NODES:-2}"

log() { echo "[slurm-cluster] $*" >&2; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sinfo >/dev/null \
     && command -v munged >/dev/null; then
    return
  fi
  if [ "$(id -u)" != 0 ]; then log "need root to apt-get install slurm"; exit 1; fi
  log "installing slurmctld slurmd slurm-client munge (apt-get)"
  # Keep the packages' maintainer scripts from starting services: we start our own daemons.
  local had_policy=0
  [ -e /usr/sbin/policy-rc.d ] && had_policy=1
  if [ "$had_policy" = 0 ]; then printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
  if [ "$had_policy" = 0 ]; then rm -f /usr/sbin/policy-rc.d; fi
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

start_munge() {
  if [ -S /run/munge/munge.socket.2 ] && munge -n >/dev/null 2>&1; then
    log "munged already running"; return
  fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  if [ ! -s /etc/munge/munge.key ]; then
    runuser -u munge -- /usr/sbin/mungekey --create 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1
    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  fi
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do [ -s /run/munge/munged.pid ] && break; sleep 0.1; done
  cp /run/munge/munged.pid "$STATE/munged.pid"   # ours: `down` stops it
}

up() {
  install_packages
  if [ -s "$STATE/slurmctld.pid" ] && kill -0 "$(cat "$STATE/slurmctld.pid")" 2>/dev/null; then
    log "already up ($STATE)"; return
  fi
  rm -rf "$STATE"; mkdir -p "$STATE/ctld"
  local i node_lines=""
  for i in $(seq "$NODES"); do
    mkdir -p "$STATE/spool-n$i"
    node_lines+="NodeName=n$i NodeAddr=127.0.0.1 Port=$(free_port) CPUs=$CPUS State=UNKNOWN\n"
  done
  sed -e "s#@STATE@#$STATE#g" -e "s#@NODES@#${node_lines%\\n}#" -e "s#@NODELIST@#n[1-$NODES]#" \
      -e "s#@CTLD_PORT@#${LDM_SLURM_CTLD_PORT:-$(free_port)}#g" \
      "$HERE/slurm.conf.in" > "$CONF"
  start_munge
  export SLURM_CONF="$CONF"
  slurmctld -i -f "$CONF"
  for i in $(seq "$NODES"); do slurmd -N "n$i" -f "$CONF"; done
  local t0=$SECONDS
  until [ "$(sinfo -h -N -o '%T' 2>/dev/null | grep -cx idle)" = "$NODES" ]; do
    if (( SECONDS - t0 > 60 )); then
      log "node did not become idle in 60 s; logs:"; tail -n 20 "$STATE"/slurm*.log >&2; exit 1
    fi
    sleep 0.5
  done
  log "up in $((SECONDS - t0)) s: $(sinfo -h -o '%P %D %c %T %N')  (export SLURM_CONF=$CONF)"
}

down() {
  local f pid
  for f in $(cd "$STATE" 2>/dev/null && ls slurmd-*.pid 2>/dev/null | sed 's/\.pid$//') slurmctld munged; do
    [ -s "$STATE/$f.pid" ] || continue
    pid="$(cat "$STATE/$f.pid")"
    if kill -0 "$pid" 2>/dev/null; then kill "$pid" 2>/dev/null || true; fi
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
  done
  rm -rf "$STATE"
  log "down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 up|down|env" >&2; exit 2 ;;
esac
