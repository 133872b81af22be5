#!/usr/bin/env bash
# `make demo`: the main job on the embedded defaults (SQLite policy store and a local MLflow
# store under the data directory), on the bundled Fashion-MNIST exit logs:
# calibrate -> solve + certify -> evaluate on held-out logs -> store -> approve (four eyes)
# -> activate in staging and production -> monitor shadow traffic -> verify the audit chain
# -> audit report -> MLflow.
# Starts from a clean demo data directory each time, so it can be run again.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
export EXITWISE_DATA_DIR="${DEMO_DATA_DIR:-$PWD/.exitwise/demo}"
unset EXITWISE_DATABASE_URL EXITWISE_TOKEN
DATA="${DEMO_LOGS_DIR:-examples/data/fashion_mnist}"
CAL="$DATA/calibration.parquet"; TEST="$DATA/test.parquet"; CARD="$DATA/card.json"
CORRUPTED="$DATA/corrupted.parquet"  # the test images with noise and contrast loss (examples/fashion_mnist/corrupt.py)
SEGMENT="${DEMO_SEGMENT:-capture}"
OUT="$EXITWISE_DATA_DIR"
rm -rf "$OUT"; mkdir -p "$OUT"
MODEL=$(python -c 'import json,sys; print(json.load(open(sys.argv[1]))["model"])' "$CARD")

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1/9 calibrate each exit (fit on one half of the calibration logs, report on the other)"
exitwise calibrate "$CAL" --card "$CARD" --out "$OUT/calibration"

step "2/9 solve per-exit/class/segment thresholds, certified: disagreement <= 1% with 95% confidence"
exitwise solve "$CAL" --card "$CARD" --test "$TEST" --risk disagreement --eps 0.01 --delta 0.05 \
  --segment-key "$SEGMENT" --segment-budget "*=0.02" --out "$OUT/policy.json"

step "3/9 evaluate the policy on the held-out test logs"
exitwise evaluate "$OUT/policy.json" "$TEST" --card "$CARD"

step "4/9 policy store: migrate, create principals (tokens stay in this shell)"
exitwise db upgrade
ADMIN=$(exitwise principal add demo-admin --role admin --quiet)
AUTHOR=$(EXITWISE_TOKEN="$ADMIN" exitwise principal add alice --role author --quiet)
APPROVER=$(EXITWISE_TOKEN="$ADMIN" exitwise principal add bob --role approver --quiet)

step "5/9 alice stores the policy; bob approves it and activates it in staging, then production"
EXITWISE_TOKEN="$AUTHOR" exitwise policy create "$OUT/policy.json"
EXITWISE_TOKEN="$APPROVER" exitwise policy approve "$MODEL" 1 --reason "demo: certified on the bundled logs"
EXITWISE_TOKEN="$APPROVER" exitwise policy activate "$MODEL" 1 --env staging --reason "demo rollout"
EXITWISE_TOKEN="$APPROVER" exitwise policy activate "$MODEL" 1 --env production --reason "demo rollout"
exitwise policy list "$MODEL"

step "6/9 monitor: shadow traffic in batches of 1,000; held-out logs in staging, corrupted images in production"
EXITWISE_TOKEN="$AUTHOR" exitwise monitor ingest "$TEST" --model "$MODEL" --env staging --batch-rows 1000
exitwise monitor status "$MODEL" --env staging
if [ -f "$CORRUPTED" ]; then
  EXITWISE_TOKEN="$AUTHOR" exitwise monitor ingest "$CORRUPTED" --model "$MODEL" --env production --batch-rows 1000
  exitwise monitor status "$MODEL" --env production
fi

step "7/9 verify the tamper-evident audit trail"
exitwise audit verify
exitwise audit export --format jsonl --out "$OUT/audit.jsonl"

step "8/9 audit report for the compliance reviewer"
exitwise report "$MODEL" 1 --format html --out "$OUT/report.html"
exitwise report "$MODEL" 1 --format pdf --out "$OUT/report.pdf"

step "9/9 MLflow: register the policy as a pyfunc model, aliases follow the lifecycle"
exitwise mlflow sync
URI=$(exitwise mlflow uri "$MODEL" --env production)
TRACKING=$(exitwise mlflow uri --tracking)
python - "$TRACKING" "$URI" "$TEST" "$SEGMENT" <<'PY'
import sys

import mlflow
import pandas as pd

tracking, uri, test, segment = sys.argv[1:]
mlflow.set_tracking_uri(tracking)
model = mlflow.pyfunc.load_model(uri)
logs = pd.read_parquet(test).head(8)
logs[segment] = logs[segment].astype(str)
cols = [c for c in logs.columns if c.startswith("exit_")] + [segment]
print(f"mlflow.pyfunc.load_model({uri!r}).predict(8 test rows):")
print(model.predict(logs[cols]).to_string(index=False))
PY

step "done"
cat <<MSG
policy:      $OUT/policy.json
report:      $OUT/report.html  (and report.pdf)
audit trail: $OUT/audit.jsonl
database:    $OUT/exitwise.db (SQLite)   MLflow: $TRACKING
load it:     mlflow.set_tracking_uri("$TRACKING"); mlflow.pyfunc.load_model("$URI")
serve it:    EXITWISE_DATA_DIR=$OUT exitwise serve --host 127.0.0.1 --port 8000
MSG
