#!/usr/bin/env bash
# Run time of `pulse run` on files whose events spread over many services:
# 100,000 events over 1,000 minutes with 10, 100 and 1,000 services, and
# 400,000 events with 200,000 distinct services (a hostile producer).
# Usage: benches/cardinality/run.sh PULSE_BINARY [max_services]
set -euo pipefail
bin="$1"
cap="${2:-}"
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
gen() { # events minutes services file
  python3 - "$@" <<'PY'
import json, sys
n, minutes, services, path = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
t0 = 1_795_305_600_000
step = minutes * 60_000 / n
with open(path, "w") as f:
    for i in range(n):
        f.write(json.dumps({
            "event_id": i, "ts": int(t0 + i * step), "user_id": 1 + i % 997,
            "item_id": 1 + i % 499, "event_type": "view",
            "service": f"svc-{i % services}", "endpoint": "/x",
            "status": 500 if i % 50 == 0 else 200, "latency_ms": 5 + i % 40,
        }) + "\n")
PY
}
for spec in "100000 1000 10" "100000 1000 100" "100000 1000 1000" "400000 100 200000"; do
  set -- $spec
  gen "$1" "$2" "$3" "$dir/in.jsonl"
  rm -rf "$dir/data"
  env=()
  if [ -n "$cap" ]; then env=(PULSE_VALIDATION__MAX_SERVICES="$cap"); fi
  start=$(date +%s.%N)
  timeout "${PULSE_BENCH_TIMEOUT:-900}" env "${env[@]}" PULSE_RECO__ENABLED=false "$bin" run --input "$dir/in.jsonl" --data-dir "$dir/data" >/dev/null 2>&1 || echo "  (stopped after ${PULSE_BENCH_TIMEOUT:-900} s or failed)"
  end=$(date +%s.%N)
  printf '%8s events, %5s minutes, %7s services: %6.1f s\n' "$1" "$2" "$3" "$(echo "$end - $start" | bc)"
done
