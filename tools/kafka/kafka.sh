#!/usr/bin/env bash
# Start, inspect, fault and stop a local Apache Kafka broker or three-node KRaft cluster.
#   tools/kafka/kafka.sh up [--nodes 1|3] [--dir .kafka]    prints BOOTSTRAP=127.0.0.1:PORT[,...]
#   tools/kafka/kafka.sh status|down [--dir .kafka]
#   tools/kafka/kafka.sh kill|restart --node N [--dir .kafka]
# The jars come from Maven Central through pom.xml beside this script, cached in ~/.cache/assured.
# The work is done by assured.testing.kafka (also the test suite's fixture), in the project's venv.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
python="$root/.venv/bin/python"
if [ ! -x "$python" ]; then
  make -C "$root" --no-print-directory .venv/.installed >&2
fi
export ASSURED_KAFKA_TOOLS="$here"
exec "$python" -m assured.testing.kafka "$@"
