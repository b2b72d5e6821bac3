#!/usr/bin/env bash
# The /recommend serving benchmark of the README, end to end:
#   1. a private redis-server on a free loopback port (nothing persisted),
#   2. the serving dataset: `pulse gen --events 3000000 --seed 7` trained by
#      `pulse run --input ... --redis` (95,353 users, 20,000 items, dim 32),
#   3. `pulse serve` on a free port, then wrk with benches/wrk/recommend.lua
#      (random user ids 1..110000, k=10) at 10 and 1,000 connections.
# Usage: benches/wrk/recommend.sh [PULSE_BINARY] [SECONDS]
# (default target/release/pulse, 20 s per run; needs redis-server and wrk).
# The generated events (~680 MB) and Parquet output live in a temp dir that is
# removed at the end; set KEEP=1 to keep it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PULSE="$(realpath "${1:-target/release/pulse}")"
SECS="${2:-20}"
LUA="$(pwd)/benches/wrk/recommend.lua"
command -v redis-server >/dev/null || { echo "needs redis-server" >&2; exit 1; }
command -v wrk >/dev/null || { echo "needs wrk" >&2; exit 1; }

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}
wait_port() {
  for _ in $(seq 1 300); do
    if python3 -c "import socket; s=socket.socket(); s.settimeout(0.2); s.connect(('127.0.0.1',$1))" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "nothing listens on port $1" >&2; return 1
}

dir="$(mktemp -d -t pulse-reco-bench.XXXXXX)"
serve_pid=""
cleanup() {
  [ -n "$serve_pid" ] && kill "$serve_pid" 2>/dev/null || true
  [ -f "$dir/redis.pid" ] && kill "$(cat "$dir/redis.pid")" 2>/dev/null || true
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $dir" >&2; else rm -rf "$dir"; fi
}
trap cleanup EXIT

rport="$(free_port)"
redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" \
  --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
wait_port "$rport"
redis="redis://127.0.0.1:$rport/"

"$PULSE" gen --events 3000000 --seed 7 --out "$dir/events.jsonl" >&2
"$PULSE" run --config config/pulse.toml --input "$dir/events.jsonl" --redis "$redis" \
  --data-dir "$dir/data" >/dev/null 2>&1
rm -f "$dir/events.jsonl"
# let the training run's writes reach the disk before measuring serving
sync
sleep 5
echo "users $(redis-cli -p "$rport" hlen pulse:reco:user), items $(redis-cli -p "$rport" hlen pulse:reco:item)" >&2

sport="$(free_port)"
"$PULSE" serve --config config/pulse.toml --redis "$redis" --listen "127.0.0.1:$sport" \
  >"$dir/serve.log" 2>&1 &
serve_pid=$!
wait_port "$sport"
sleep 2 # the first item cache load
curl -sf "http://127.0.0.1:$sport/recommend/1?k=10" >/dev/null

for c in 10 1000; do
  echo "== $c connections, ${SECS}s" >&2
  nice -n 5 wrk -t2 -c"$c" -d"${SECS}s" --latency -s "$LUA" "http://127.0.0.1:$sport" 2>&1 |
    grep -E "Latency Distribution|50%|75%|90%|99%|requests in|Requests/sec|Non-2xx|Socket errors"
done
