#!/usr/bin/env bash
# phxq beside RabbitMQ quorum queues, interleaved, on this machine (issue 3's throughput target).
#
# usage: scripts/bench-vs-rabbitmq.sh [ROUNDS]        (default 2 rounds; ~3 min per round)
#
# Each round: a fresh `phxq dev` (3 nodes, 24 groups, topic `test` with 8 queues), then
# `phxq bench produce` with 16 and 64 producers, each waiting for its own acknowledgement
# (1 KB, no client batching); then RabbitMQ 3-node quorum queue + publisher confirms with the
# same producer counts through ../shared/peers (its `peerbench --window 1`). Before every case
# the machine must be idle (the peer scripts' `wait_quiet`) and a 1 s raw fsync probe runs.
# Only ratios between neighbouring runs mean anything on this machine (its fsync rate swings
# fiftyfold); the summary pairs each phxq round with the RabbitMQ round after it.
#
# Environment: PHXQ (binary, default target/release/phxq, built if missing), PEERS (default
# ../shared/peers), OUT (results directory, default /tmp/phxq-vs-rabbitmq), DURATION (10 s),
# WARMUP (2 s), PRODUCERS ("16 64"), WINDOW (1: every message waits for its own ack; N > 1:
# phxq producers send N messages per call (client batching, one ack per call) and RabbitMQ's
# keep N publishes in flight (pipelining, one confirm each) -- issue 4's "client batching or
# pipelining on both sides").
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=${1:-2}
PHXQ=${PHXQ:-$ROOT/target/release/phxq}
PEERS=${PEERS:-$ROOT/../shared/peers}
OUT=${OUT:-/tmp/phxq-vs-rabbitmq}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
PRODUCERS=${PRODUCERS:-16 64}
WINDOW=${WINDOW:-1}
DATA=$OUT/phxq-data
# shellcheck source=/dev/null
source "$PEERS/common.sh"
ensure_peerbench
[ -x "$PHXQ" ] || (cd "$ROOT" && cargo build --release -p phxq)
mkdir -p "$OUT"
: > "$OUT/phxq.jsonl"
: > "$OUT/rabbitmq.jsonl"

DEV_PID=
stop_dev() {
  if [ -n "$DEV_PID" ]; then
    kill -INT "$DEV_PID" 2>/dev/null || true
    wait "$DEV_PID" 2>/dev/null || true
    DEV_PID=
  fi
}
trap stop_dev EXIT

for round in $(seq "$ROUNDS"); do
  echo "== round $round: phxq"
  "$PHXQ" dev --clean --dir "$DATA" > "$OUT/dev.log" 2>&1 &
  DEV_PID=$!
  for P in $PRODUCERS; do
    wait_quiet > /dev/null
    "$PHXQ" bench produce --producers "$P" --batch "$WINDOW" --duration-s "$DURATION" \
      --warmup-s "$WARMUP" --server-pids "$DEV_PID" --probe-dir "$OUT" --json |
      python3 -c "import json,sys; j=json.load(sys.stdin); j['round']=$round; print(json.dumps(j))" \
      >> "$OUT/phxq.jsonl"
    tail -1 "$OUT/phxq.jsonl" | python3 -c "import json,sys; j=json.load(sys.stdin); r=j['report']; print(f\"phxq P=$P {r['msgs_per_sec']:.0f} msgs/s p99 {r['p99_ms']} ms\")"
  done
  stop_dev
  echo "== round $round: RabbitMQ"
  RESULTS=$OUT/rabbitmq-round QUIET_MAX=${QUIET_MAX:-180} REPS=1 DURATION=$DURATION WARMUP=$WARMUP \
    MATRIX=$(for P in $PRODUCERS; do printf '%s:%s ' "$P" "$WINDOW"; done) \
    bash "$PEERS/rabbitmq/bench.sh" 3 > "$OUT/rabbitmq-round-$round.log" 2>&1
  python3 -c "
import json,sys
for line in open(sys.argv[1]):
    j=json.loads(line); j['round']=$round; print(json.dumps(j))
" "$OUT/rabbitmq-round/rabbitmq-qq-3.jsonl" >> "$OUT/rabbitmq.jsonl"
  tail -n "$(echo "$PRODUCERS" | wc -w)" "$OUT/rabbitmq.jsonl" |
    python3 -c "import json,sys; [print(f\"RabbitMQ P={j['producers']} {j['msgs_per_s']:.0f} msgs/s p99 {j['p99_ms']} ms\") for j in map(json.loads, sys.stdin)]"
done

python3 "$ROOT/scripts/summarize-vs-rabbitmq.py" "$OUT/phxq.jsonl" "$OUT/rabbitmq.jsonl"
