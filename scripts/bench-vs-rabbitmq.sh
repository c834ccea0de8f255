#!/usr/bin/env bash
# phxq beside RabbitMQ quorum queues: `scripts/bench-vs-peer.sh rabbitmq [ROUNDS]` (see there).
exec "$(dirname "$0")/bench-vs-peer.sh" rabbitmq "$@"
