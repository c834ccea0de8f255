#!/usr/bin/env bash
# A/B of two phxq builds on the same workload, interleaved: A, B, A, B, ...
#
# usage: scripts/bench-store-ab.sh BIN_A BIN_B [ROUNDS] [PRODUCERS...]
#        (default 2 rounds, producers 16 64; ~15 s per case)
#
# Each case: a fresh `BIN dev` (3 nodes on the default ports, data in /tmp/phxq-ab-data), then
# `BIN bench produce --producers P` (6 s measured, 2 s warmup, each producer waiting for its own
# acknowledgement), then Ctrl-C. One line per case: msgs/s, p99, the store's CPU, messages per
# raft entry, rounds and fsyncs per second over the 3 nodes, and the store's context switches
# per message (voluntary + involuntary, all its threads, warmup included). Only ratios between
# neighbouring cases mean anything on this machine.
set -euo pipefail
A=$1; B=$2; ROUNDS=${3:-2}; shift $(( $# < 3 ? $# : 3 ))
PRODUCERS=${*:-16 64}
DATA=/tmp/phxq-ab-data
case_line() { # case_line BIN P
  local bin=$1 p=$2 dev c0 c1 out
  rm -rf "$DATA"
  "$bin" dev --clean --dir "$DATA" > /tmp/phxq-ab-dev.log 2>&1 &
  dev=$!
  sleep 4
  switches() { cat /proc/"$dev"/task/*/status 2>/dev/null | awk '/ctxt_switches/{s+=$2} END{print s}'; }
  c0=$(switches)
  out=$("$bin" bench produce --producers "$p" --duration-s 6 --warmup-s 2 --server-pids "$dev" \
    --probe-dir /tmp --fsync-probe-s 1 --json)
  c1=$(switches)
  kill -INT "$dev"; wait "$dev" || true
  python3 - "$out" "$bin" "$p" "$c0" "$c1" <<'PY'
import json, sys
j = json.loads(sys.argv[1]); r = j["report"]; s = r["store"]; u = r["usage"]
msgs = r["msgs_per_sec"] * 8  # 2 s warmup + 6 s measured, switches counted over both
print(f"{sys.argv[2]:>24} P={sys.argv[3]:>3} msgs/s={r['msgs_per_sec']:7.0f} p99={r['p99_ms']:6.2f}ms "
      f"server_cores={u['server_cores']:.2f} client_cores={u['client_cores']:.2f} "
      f"msgs/entry={s['messages_per_proposal']:.2f} rounds/s={s['rounds_per_sec']:.0f} "
      f"fsyncs/s={s['syncs_per_sec']:.0f} switches/msg={(int(sys.argv[5]) - int(sys.argv[4])) / msgs:.2f} "
      f"fsync_probe={j['fsync_probe_before_per_s']:.0f}/s")
PY
}
for _ in $(seq "$ROUNDS"); do
  for bin in "$A" "$B"; do
    for p in $PRODUCERS; do case_line "$bin" "$p"; done
  done
done
