#!/usr/bin/env bash
# Make sure the PostgreSQL used by the store tests is up (127.0.0.1:5432 unless
# EXITWISE_TEST_POSTGRES_URL says otherwise). Starts the local cluster when it is down.
# Under CI (CI=true) an unreachable server is an error; elsewhere the tests skip with a reason.
set -uo pipefail
host=127.0.0.1; port=5432
ready() { command -v pg_isready >/dev/null 2>&1 && pg_isready -q -h "$host" -p "$port"; }
ready && exit 0
if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
  for v in $(ls /etc/postgresql); do
    pg_ctlcluster --skip-systemctl-redirect "$v" main start >/dev/null 2>&1 || true
  done
  for _ in $(seq 1 30); do ready && exit 0; sleep 1; done
fi
if [ "${CI:-}" = "true" ]; then
  echo "ensure-postgres: PostgreSQL is not reachable at $host:$port; the store tests need it under CI" >&2
  exit 1
fi
echo "ensure-postgres: PostgreSQL not reachable at $host:$port; PostgreSQL tests will be skipped" >&2
exit 0
