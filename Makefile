# The two commands a fresh clone needs: `make demo` and `make test`. Each makes or refreshes
# .venv by itself; `make test` also installs the system packages its services need (when
# missing) and starts those services itself (a real Kafka broker and cluster, PostgreSQL).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NODES ?= 1
KAFKA_DIR ?= .kafka
PYTEST_ARGS ?=
# Quix Streams (for the runtime benchmark and its test) pins an older confluent-kafka than
# assured does, so it lives in a virtualenv of its own.
QUIX_VENV := .venv-quix
QUIX_STAMP := $(QUIX_VENV)/.installed
# The Quix Streams release the README's figures were measured against.
QUIX_VERSION ?= 3.28.1
# FastStream, beside assured in the io bench: a virtualenv of its own too.
FASTSTREAM_VENV := .venv-faststream
FASTSTREAM_STAMP := $(FASTSTREAM_VENV)/.installed
FASTSTREAM_VERSION ?= 0.7.8

.PHONY: demo test test-slow lint typecheck pytest system-deps kafka-up kafka-down kafka-status clean
.PHONY: examples

demo: $(STAMP)
	$(BIN)/assured demo

test: system-deps $(STAMP) $(QUIX_STAMP) lint typecheck pytest

# The example Apps, each audited with `assured audit --app` under crashes; each correct one
# passes and each careless variant fails with duplicates (payments starts a throwaway PostgreSQL
# unless PAYMENTS_DSN names one).
examples: system-deps $(STAMP)
	$(BIN)/python -m examples.receipts
	$(BIN)/python -m examples.payments
	$(BIN)/python -m examples.notifications

# Everything, soak and fault suites included.
test-slow: system-deps $(STAMP) $(QUIX_STAMP) $(FASTSTREAM_STAMP)
	$(BIN)/pytest -m "" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests examples
	$(BIN)/ruff format --check src tests examples

typecheck: $(STAMP)
	$(BIN)/mypy

# Two pytest workers, each with its own broker and PostgreSQL (session fixtures), a test file
# to each in turn: most tests wait (sessions, timeouts, the services), so on two cores this
# halves the wall time. PYTEST_WORKERS=0 runs them in this process, one after the other.
PYTEST_WORKERS ?= 2
pytest: $(STAMP)
	$(BIN)/pytest -m "not slow" $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadfile) --durations=15 $(PYTEST_ARGS)

# The soak (marked slow; never part of `make test`): audit rounds with every fault mixed in until
# each guarantee has taken its share of processor SIGKILLs (1,000 exactly-once, 300 the others),
# on the embedded engine, one broker and three brokers (with broker kills). A round mostly waits
# (session timeouts, frozen zombies), so the three logs run side by side. Resumable: each run
# continues benchmarks/results/soak-*.json, so it can span sessions; hours on this machine.
SOAK_HOURS ?= 24
.PHONY: soak
soak: system-deps $(STAMP)
	@pids=""; rc=0; \
	for log in embedded kafka cluster; do \
	  $(BIN)/python -m assured.audit.soak --log $$log --out benchmarks/results/soak-$$log.json \
	    --hours $(SOAK_HOURS) & pids="$$pids $$!"; \
	done; \
	for pid in $$pids; do wait $$pid || rc=1; done; exit $$rc

# The audit's acceptance matrix: each guarantee on each log into topics and into PostgreSQL,
# 5,000 messages, 30 faults; resumes from benchmarks/results/acceptance-*.json (delete to redo)
ACCEPTANCE_CELLS ?= embedded-topic kafka-topic cluster-topic embedded-postgres kafka-postgres cluster-postgres
.PHONY: acceptance
acceptance: system-deps $(STAMP)
	rc=0; for cell in $(ACCEPTANCE_CELLS); do \
	  $(BIN)/python -m assured.audit.acceptance --log $${cell%-*} --sink $${cell#*-} \
	    --out benchmarks/results/acceptance-$$cell.json || rc=1; \
	done; exit $$rc

# Handlers that wait, side by side (issue 14): each guarantee at concurrency 1, 50, 200 and 1,000
# against a bare asyncio loop, on a fresh broker and on the embedded engine; kept in
# benchmarks/results/io-{kafka,embedded}.{json,md}.
.PHONY: bench-io faststream-venv
bench-io: system-deps $(STAMP) $(FASTSTREAM_STAMP)
	@boot=$$($(BIN)/python -m assured.testing.kafka up --dir .kafka-bench | sed -n 's/^BOOTSTRAP=//p'); \
	$(BIN)/assured bench --suite io --log kafka://$$boot --faststream-python $(FASTSTREAM_VENV)/bin/python \
	  $(BENCH_ARGS); rc=$$?; \
	$(BIN)/python -m assured.testing.kafka down --dir .kafka-bench; \
	[ $$rc -eq 0 ] && rm -rf /tmp/assured-bench-io && \
	$(BIN)/assured bench --suite io --log embedded:///tmp/assured-bench-io $(BENCH_ARGS)

faststream-venv: $(FASTSTREAM_STAMP)
$(FASTSTREAM_STAMP): Makefile
	@test -x $(FASTSTREAM_VENV)/bin/python || $(PYTHON) -m venv $(FASTSTREAM_VENV)
	$(FASTSTREAM_VENV)/bin/python -m pip install --quiet "faststream[confluent]==$(FASTSTREAM_VERSION)" psutil
	@touch $@

# The embedded log's numbers (both durabilities); also kept in benchmarks/results/log-embedded.*
.PHONY: bench-log bench quix-venv
bench-log: $(STAMP)
	$(BIN)/assured bench --suite log --log embedded:///tmp/assured-bench --json

# Quix Streams pins an older confluent-kafka than assured: it gets a virtualenv of its own.
quix-venv: $(QUIX_STAMP)
$(QUIX_STAMP): Makefile
	@test -x $(QUIX_VENV)/bin/python || $(PYTHON) -m venv $(QUIX_VENV)
	$(QUIX_VENV)/bin/python -m pip install --quiet "quixstreams==$(QUIX_VERSION)" psutil
	@touch $@

# The runtime suite, BENCH_RUNS independent times per backend (on Kafka each run on a fresh
# broker of its own, started here and stopped after), each run's rows kept in
# benchmarks/results/runs/; then the median of the runs, with ranges and the ratios from those
# medians, in benchmarks/results/runtime-{kafka,embedded}.{json,md} (what the README quotes).
# Stop everything else first: a run measured on a busy machine is redone, then left out.
BENCH_ARGS ?=
BENCH_RUNS ?= 3
RUNS_DIR := benchmarks/results/runs
bench: system-deps $(STAMP) $(QUIX_STAMP)
	@set -e; rm -rf $(RUNS_DIR); \
	for i in $$(seq 1 $(BENCH_RUNS)); do \
	  boot=$$($(BIN)/python -m assured.testing.kafka up --dir .kafka-bench | sed -n 's/^BOOTSTRAP=//p'); \
	  $(BIN)/assured bench --suite runtime --log kafka://$$boot --quix-python $(QUIX_VENV)/bin/python \
	    --results-dir $(RUNS_DIR)/$$i $(BENCH_ARGS) || { $(BIN)/python -m assured.testing.kafka down --dir .kafka-bench; exit 1; }; \
	  $(BIN)/python -m assured.testing.kafka down --dir .kafka-bench; \
	  rm -rf /tmp/assured-bench-runtime; \
	  $(BIN)/assured bench --suite runtime --log embedded:///tmp/assured-bench-runtime \
	    --results-dir $(RUNS_DIR)/$$i $(BENCH_ARGS); \
	done; \
	for backend in kafka embedded; do \
	  $(BIN)/python -m assured.bench.combine $(RUNS_DIR)/*/runtime-$$backend.json \
	    --out benchmarks/results/runtime-$$backend --command "make bench BENCH_RUNS=$(BENCH_RUNS) $(BENCH_ARGS)"; \
	done

# The venv is rebuilt when pyproject.toml changes; pip's own check makes a no-op refresh cheap.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

# Java and Maven run the Kafka broker; PostgreSQL's server is for the sink tests; kcat is a
# client nobody here wrote, for interop tests. Installed from Debian's packages when missing.
system-deps:
	@missing=""; \
	command -v java >/dev/null || missing="$$missing openjdk-17-jre-headless"; \
	command -v mvn >/dev/null || missing="$$missing maven"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v kcat >/dev/null || missing="$$missing kcat"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		if [ "$$(id -u)" != 0 ]; then echo "need root (or sudo) to install:$$missing" >&2; exit 1; fi; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

kafka-up: $(STAMP)
	$(BIN)/python -m assured.testing.kafka up --nodes $(NODES) --dir $(KAFKA_DIR)

kafka-down: $(STAMP)
	$(BIN)/python -m assured.testing.kafka down --dir $(KAFKA_DIR)

kafka-status: $(STAMP)
	$(BIN)/python -m assured.testing.kafka status --dir $(KAFKA_DIR)

clean:
	rm -rf $(VENV) $(QUIX_VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis build dist
