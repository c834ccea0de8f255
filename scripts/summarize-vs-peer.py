#!/usr/bin/env python3
"""Pairs each phxq round with the peer's round run right after it (same producer count) and
prints the per-round ratios, the median of each side and the ratio of the medians.

usage: summarize-vs-peer.py PHXQ_JSONL PEER_JSONL [PEER_NAME]
(the files `scripts/bench-vs-peer.sh` writes)"""
import json
import statistics
import sys


def load(path):
    return [json.loads(line) for line in open(path) if line.strip()]


def main(phxq_path, rabbit_path, name="RabbitMQ"):
    phxq = {}
    for j in load(phxq_path):
        r = j["report"]
        phxq[(j["producers"], j["round"])] = (r["msgs_per_sec"], r["p99_ms"], j.get("fsync_probe_before_per_s"))
    rabbit = {}
    for j in load(rabbit_path):
        rabbit[(j["producers"], j["round"])] = (j["msgs_per_s"], j["p99_ms"], j.get("fsync_calib_per_s"))
    print(f"| producers | round | phxq msgs/s | phxq p99 ms | {name} msgs/s | {name} p99 ms | ratio | fsync probe /s, phxq / {name} |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for producers in sorted({p for p, _ in phxq}):
        rounds = sorted(r for p, r in phxq if p == producers)
        ratios = []
        for rnd in rounds:
            ours = phxq[(producers, rnd)]
            theirs = rabbit.get((producers, rnd))
            if theirs is None:
                continue
            ratio = ours[0] / theirs[0]
            ratios.append(ratio)
            print(f"| {producers} | {rnd} | {ours[0]:,.0f} | {ours[1]:.2f} | {theirs[0]:,.0f} | {theirs[1]:.2f} | {ratio:.2f} | {ours[2] or 0:,.0f} / {theirs[2] or 0:,} |")
        ours = statistics.median(phxq[(producers, r)][0] for r in rounds)
        theirs_all = [v[0] for (p, _), v in rabbit.items() if p == producers]
        if theirs_all:
            theirs = statistics.median(theirs_all)
            print(f"| {producers} | median | {ours:,.0f} | | {theirs:,.0f} | | **{ours / theirs:.2f}** | |")
    print()


if __name__ == "__main__":
    main(*sys.argv[1:4])
