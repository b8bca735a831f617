#!/bin/sh
# Produces docs/img/grafana-dashboard.png: runs a hub (with Mosquitto) under simulated base stations,
# scraped by Prometheus every 5 s, with a broker outage and a burst of half-open connections on the
# way, then draws the dashboard's panels from Prometheus with render.py. Needs: the hub installed in
# .venv, mosquitto, prometheus (Debian packages) and matplotlib. Usage: contrib/grafana/screenshot.sh [MINUTES]
# (RENDER_DATA=FILE keeps the query results, to draw again with render.py --data FILE).
set -eu
minutes=${1:-6}
repo=$(cd "$(dirname "$0")/../.." && pwd)
bin=$repo/.venv/bin
work=$(mktemp -d)
pids=""
cleanup() { for pid in $pids; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT INT TERM
cd "$work"
token=dashboard-demo-token
export BSSCIHUB_DATA_DIR="$work/var" BSSCIHUB_WEB_LISTEN=tcp:18080:interface=127.0.0.1 \
    BSSCIHUB_BSSCI_LISTEN=tcp:16117:interface=127.0.0.1 BSSCIHUB_MQTT_URL=mqtt://127.0.0.1:18830 \
    BSSCIHUB_WEB_METRICS_TOKEN="sha256:$(printf %s "$token" | sha256sum | cut -d' ' -f1)"
cp "$repo/etc/hub.yaml" hub.yaml
"$bin/bsscihub" --config hub.yaml init >/dev/null
mosquitto -p 18830 >mosquitto.log 2>&1 & mosquitto=$!; pids="$pids $mosquitto"
"$bin/twistd" -n --pidfile= bsscihub --config hub.yaml >hub.log 2>&1 & pids="$pids $!"
cat >prometheus.yml <<YAML
global: {scrape_interval: 5s}
scrape_configs:
  - job_name: bsscihub
    authorization: {credentials: $token}
    static_configs: [{targets: ["127.0.0.1:18080"]}]
YAML
prometheus --config.file=prometheus.yml --storage.tsdb.path=prom --web.listen-address=127.0.0.1:19090 \
    >prometheus.log 2>&1 & pids="$pids $!"
until curl -sf -o /dev/null localhost:18080/health/live; do sleep 0.5; done
"$bin/bsscihub" --config hub.yaml sim --sensors 400 --write-endpoints endpoints.json >/dev/null
"$bin/bsscihub" --config hub.yaml sensors import endpoints.json >/dev/null
"$bin/bsscihub" --config hub.yaml sim --base-stations 4 --sensors 400 --copies 3 --rate 40 \
    --duration $((minutes * 60)) --quiet --cert-dir stations >sim.log 2>&1 & pids="$pids $!"
# Web traffic, and a few refused log-ins, all along.
( while sleep 1; do curl -s -o /dev/null localhost:18080/api/v1/openapi.json
    curl -s -o /dev/null -H 'Content-Type: application/json' -d '{"username":"x","password":"y"}' \
        localhost:18080/api/v1/auth/login; done ) & pids="$pids $!"
sleep $((minutes * 60 / 3))
kill "$mosquitto"  # a broker outage: the outbox holds what the hub publishes meanwhile
"$bin/python" - <<'PY'
import socket, time
held = [socket.create_connection(("127.0.0.1", 16117)) for _ in range(60)]  # never handshake
time.sleep(20)
PY
sleep 40
mosquitto -p 18830 >>mosquitto.log 2>&1 & pids="$pids $!"
sleep $((minutes * 60 * 2 / 3 - 60))
"$bin/python" "$repo/contrib/grafana/render.py" --prometheus http://127.0.0.1:19090 --minutes "$minutes" \
    --out "$repo/docs/img/grafana-dashboard.png" ${RENDER_DATA:+--data "$RENDER_DATA"}
