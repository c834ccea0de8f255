#!/usr/bin/env bash
# phxq beside a peer broker, interleaved, on this machine (issues 3 and 4's throughput figures).
#
# usage: scripts/bench-vs-peer.sh PEER [ROUNDS]    PEER: rabbitmq | nats | redis
#                                                  (default 2 rounds; ~3 min per round)
#
# Each round: a fresh `phxq dev` (3 nodes, 24 groups, topic `test` with 8 queues), then
# `phxq bench produce` with 16 and 64 producers, each waiting for its own acknowledgement
# (1 KB, no client batching); then the peer with the same producer counts through
# the peer-broker kit in $PEERS (its `peerbench --window 1`):
#   rabbitmq  3-node quorum queue, publisher confirms;
#   nats      JetStream, 3-node cluster, R3 file stream, each publish waits for its PubAck;
#   redis     Redis Streams XADD, appendonly + appendfsync always, one node (Redis cannot
#             replicate before acknowledging), plus the peers' redis-benchmark cross-check.
# Before every case the machine must be idle (the peer scripts' `wait_quiet`) and a 1 s raw
# fsync probe runs. Only ratios between neighbouring runs mean anything on this machine (its
# fsync rate swings fiftyfold); the summary pairs each phxq round with the peer round after it.
#
# Environment: PHXQ (binary, default target/release/phxq, built if missing), PEERS (required: the
# peer-broker kit's directory, with common.sh and rabbitmq|nats|redis/bench.sh; not part of
# this repository), OUT (results directory, default /tmp/phxq-vs-PEER), DURATION (10 s),
# WARMUP (2 s), PRODUCERS ("16 64"), WINDOW (1: every message waits for its own ack; N > 1:
# phxq producers send N messages per call (client batching, one ack per call) and the peer's
# keep N publishes in flight (pipelining, one ack each) -- issue 4's "client batching or
# pipelining on both sides"), PHXQ_BENCH_ARGS (extra arguments of `phxq bench produce`, e.g.
# `--stream`: each producer's calls over one ProduceStream, still one message per call, each
# waiting for its own acknowledgement).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEER=${1:?usage: bench-vs-peer.sh rabbitmq|nats|redis [ROUNDS]}
ROUNDS=${2:-2}
case $PEER in
  rabbitmq) PEER_SCRIPT=rabbitmq/bench.sh; PEER_ARG=3; PEER_LABEL=rabbitmq-qq-3 ;;
  nats) PEER_SCRIPT=nats/bench.sh; PEER_ARG=3; PEER_LABEL=nats-js-R3 ;;
  redis) PEER_SCRIPT=redis/bench.sh; PEER_ARG=; PEER_LABEL=redis-aof-always ;;
  *) echo "unknown peer $PEER: rabbitmq, nats or redis" >&2; exit 2 ;;
esac
PHXQ=${PHXQ:-$ROOT/target/release/phxq}
PEERS=${PEERS:?set PEERS to the peer-broker kit (a directory with common.sh and rabbitmq|nats|redis/bench.sh)}
[ -f "$PEERS/common.sh" ] || { echo "PEERS=$PEERS has no common.sh" >&2; exit 2; }
OUT=${OUT:-/tmp/phxq-vs-$PEER}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
PRODUCERS=${PRODUCERS:-16 64}
WINDOW=${WINDOW:-1}
DATA=$OUT/phxq-data
# shellcheck source=/dev/null
source "$PEERS/common.sh"
ensure_peerbench
# nats/bench.sh asks `nats-server --version` before its start.sh installs the package.
[ "$PEER" = nats ] && ensure_apt nats-server
[ -x "$PHXQ" ] || (cd "$ROOT" && cargo build --release -p phxq)
mkdir -p "$OUT"
: > "$OUT/phxq.jsonl"
: > "$OUT/$PEER.jsonl"

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
    # shellcheck disable=SC2086 # PHXQ_BENCH_ARGS is a list of arguments
    "$PHXQ" bench produce ${PHXQ_BENCH_ARGS:-} --producers "$P" --batch "$WINDOW" --duration-s "$DURATION" \
      --warmup-s "$WARMUP" --server-pids "$DEV_PID" --probe-dir "$OUT" --json |
      python3 -c "import json,sys; j=json.load(sys.stdin); j['round']=$round; print(json.dumps(j))" \
      >> "$OUT/phxq.jsonl"
    tail -1 "$OUT/phxq.jsonl" | python3 -c "import json,sys; j=json.load(sys.stdin); r=j['report']; print(f\"phxq P=$P {r['msgs_per_sec']:.0f} msgs/s p99 {r['p99_ms']} ms\")"
  done
  stop_dev
  echo "== round $round: $PEER"
  RESULTS=$OUT/$PEER-round QUIET_MAX=${QUIET_MAX:-180} REPS=1 DURATION=$DURATION WARMUP=$WARMUP \
    MATRIX=$(for P in $PRODUCERS; do printf '%s:%s ' "$P" "$WINDOW"; done) \
    bash "$PEERS/$PEER_SCRIPT" $PEER_ARG > "$OUT/$PEER-round-$round.log" 2>&1
  python3 -c "
import json,sys
for line in open(sys.argv[1]):
    j=json.loads(line); j['round']=$round; print(json.dumps(j))
" "$OUT/$PEER-round/$PEER_LABEL.jsonl" >> "$OUT/$PEER.jsonl"
  tail -n "$(echo "$PRODUCERS" | wc -w)" "$OUT/$PEER.jsonl" |
    python3 -c "import json,sys; [print(f\"$PEER P={j['producers']} {j['msgs_per_s']:.0f} msgs/s p99 {j['p99_ms']} ms\") for j in map(json.loads, sys.stdin)]"
done

python3 "$ROOT/scripts/summarize-vs-peer.py" "$OUT/phxq.jsonl" "$OUT/$PEER.jsonl" "$PEER"
