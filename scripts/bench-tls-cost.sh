#!/usr/bin/env bash
# The cost of client TLS and auth (issue 12): `phxq dev` (release) plaintext without auth,
# then with --tls --auth, alternating, 3 rounds; 64 producers over ProduceStream each. Ports
# 17100-17102 and 17200-17202. Prints each run's report; BENCHMARKS.md has the figures.
# Usage: cargo build --release -p phxq && scripts/bench-tls-cost.sh
set -u
cd "$(dirname "$0")/.."
BIN=target/release/phxq
WORK=$(mktemp -d)
OUT=$WORK/results.txt
: > $OUT
for round in 1 2 3; do
  for mode in off on; do
    dir=$WORK/dev-$mode
    if [ $mode = on ]; then flags="--tls --auth"; else flags=""; fi
    $BIN dev --dir $dir --clean --client-port 17100 --peer-port 17200 $flags > $WORK/dev-$mode.log 2>&1 &
    pid=$!
    for i in $(seq 1 100); do grep -q "phxq dev: ready" $WORK/dev-$mode.log && break; sleep 0.2; done
    extra=""
    if [ $mode = on ]; then extra="--ca $dir/tls/ca.pem --token $(cat $dir/admin.token)"; fi
    res=$(timeout 120 $BIN bench produce --server 127.0.0.1:17100 --producers 64 --stream --duration-s 10 --warmup-s 2 --server-pids $pid $extra 2>&1)
    echo "=== round $round mode $mode" >> $OUT
    echo "$res" >> $OUT
    kill -TERM $pid; wait $pid
  done
done
grep -E "^(===|total)" $OUT
