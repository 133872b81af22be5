#!/usr/bin/env bash
# The monitoring example of docs/monitoring.md, on a fresh embedded store (a temporary directory):
# a Fashion-MNIST policy certified on clean logs (disagreement <= 2%, delta 0.05) is activated in
# staging and production; staging gets the held-out test logs as shadow traffic, production the
# test images with noise and contrast loss (examples/fashion_mnist/corrupt.py), in batches of 1,000.
# Run from the repository root after `make install`:  bash examples/monitoring_fashion.sh
set -eu
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
export EXITWISE_DATA_DIR=$(mktemp -d) EXITWISE_MLFLOW_SYNC=off
D=examples/data/fashion_mnist
exitwise db upgrade >/dev/null
ADMIN=$(exitwise principal add admin --role admin --quiet)
AUTHOR=$(EXITWISE_TOKEN=$ADMIN exitwise principal add alice --role author --quiet)
APPROVER=$(EXITWISE_TOKEN=$ADMIN exitwise principal add bob --role approver --quiet)
exitwise solve $D/calibration.parquet --card $D/card.json --risk disagreement --eps 0.02 --delta 0.05 \
  --out "$EXITWISE_DATA_DIR/policy.json" >/dev/null
EXITWISE_TOKEN=$AUTHOR exitwise policy create "$EXITWISE_DATA_DIR/policy.json" >/dev/null
EXITWISE_TOKEN=$APPROVER exitwise policy approve fashion-cnn 1 --reason "certified on clean logs" >/dev/null
for env in staging production; do
  EXITWISE_TOKEN=$APPROVER exitwise policy activate fashion-cnn 1 --env $env --reason rollout >/dev/null
done
EXITWISE_TOKEN=$AUTHOR exitwise monitor ingest $D/test.parquet --model fashion-cnn --env staging --batch-rows 1000 | tail -1
exitwise monitor status fashion-cnn --env staging
EXITWISE_TOKEN=$AUTHOR exitwise monitor ingest $D/corrupted.parquet --model fashion-cnn --env production --batch-rows 1000 | sed -n 1,3p
exitwise monitor status fashion-cnn --env production
exitwise monitor series fashion-cnn --env production --json | python -c "import json,sys; [print(p[\"n\"], p[\"losses\"], round(100*p[\"risk\"],2), round(100*p[\"lower\"],2), round(100*p[\"upper\"],2)) for p in json.load(sys.stdin)[\"points\"][:5]]"
