#!/usr/bin/env bash
# demo.sh: `make demo`. Starts a real worker server on a temporary state
# dir, runs a few jobs through the client, shows their output, shuts down.
set -euo pipefail
cd "$(dirname "$0")"
if [ "$(id -u)" != 0 ]; then
  echo "demo: the server needs root (namespaces, mounts, cgroups): run sudo make demo" >&2
  exit 1
fi
state=$(mktemp -d /tmp/worker-demo.XXXXXX)
port=${WORKER_DEMO_PORT:-18443}
export WORKER_ADDR=localhost:$port WORKER_TLS=$state/tls
./bin/worker -serve -listen 127.0.0.1:$port -state "$state" -grace 2s -log-level warn &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$state"' EXIT
for _ in $(seq 50); do [ -f "$state/tls/client.pem" ] && ./bin/worker -list >/dev/null 2>&1 && break; sleep 0.1; done

say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }
say worker -run -f echo "'a; rm -rf /'"
./bin/worker -run -f echo 'a; rm -rf /'
say worker -run -f -mem 64M -cpu 0.5 sh -c "'id; hostname; ps -e; touch /etc/x'"
./bin/worker -run -f -mem 64M -cpu 0.5 sh -c 'id; hostname; ps -e; touch /etc/x' || true
say "id=\$(worker -run sh -c 'for i in 1 2 3; do echo tick \$i; sleep 0.3; done')"
id=$(./bin/worker -run sh -c 'for i in 1 2 3; do echo tick $i; sleep 0.3; done')
echo "$id"
say worker -log "$id"
./bin/worker -log "$id"
say "worker -run sleep 600; worker -stop ID"
long=$(./bin/worker -run sleep 600)
./bin/worker -stop "$long"
say worker -run -f no-such-command
./bin/worker -run -f no-such-command || echo "(exit code $?)"
say worker -list
./bin/worker -list
say "shutting the server down"
