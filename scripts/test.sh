#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what is missing, starts
# redis-server and the tansu Kafka-API broker on free loopback ports, checks
# the operators' kit (scripts/check_deploy.sh), runs fmt, clippy and every
# test against them, and stops the services.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
start=$(date +%s)

# pyarrow: the independent Parquet reader used by the integration tests.
if ! python3 -c 'import pyarrow' >/dev/null 2>&1; then
  echo "test.sh: installing pyarrow" >&2
  python3 -m pip install --quiet --disable-pip-version-check pyarrow >&2
fi
# deltalake: the independent reader of the Delta tables in the integration tests.
if ! python3 -c 'import deltalake' >/dev/null 2>&1; then
  echo "test.sh: installing deltalake" >&2
  python3 -m pip install --quiet --disable-pip-version-check deltalake >&2
fi
# Chromium: the dashboard's browser test (Debian package, headless).
if ! command -v chromium >/dev/null 2>&1; then
  echo "test.sh: installing chromium" >&2
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO=sudo; fi
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >&2
fi
# Prometheus: promtool for the alert rules' unit tests, and the prometheus
# binary that tests/ops.rs runs against pulse (Debian package).
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  echo "test.sh: installing prometheus" >&2
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO=sudo; fi
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq prometheus >&2
  # the package may start a system instance on 9090; the tests run their own
  ($SUDO service prometheus stop || true) >/dev/null 2>&1
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true

eval "$(scripts/services.sh start)"
trap 'scripts/services.sh stop "$PULSE_SERVICES_DIR"' EXIT

python3 scripts/check_cycles.py --self-test
python3 scripts/check_cycles.py
scripts/check_deploy.sh
cargo fmt --check
cargo clippy --all-targets -- -D warnings
cargo test --lib --bins --tests -- --test-threads 2
echo "test.sh: suite finished in $(( $(date +%s) - start ))s" >&2
