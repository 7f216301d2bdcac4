# Streaming feature store: the user's entry points. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

export CARGO_TARGET_DIR ?= $(HOME)/.cache/sfs/target
export KAFKA_BROKERS ?= 127.0.0.1:9092
export REDIS_URL ?= redis://127.0.0.1:6379
SFS := $(CARGO_TARGET_DIR)/release/sfs

.PHONY: help setup up down status health build test demo fmt lint bench clean inspect logs  monitor train mlflow

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

setup: ## install Kafka jars, Redis, the schema registry, Prometheus, the Python venv (with ONNX Runtime); fetch crates
	bash infra/kafka.sh install
	bash infra/redis.sh install
	bash infra/registry.sh install
	bash infra/prometheus.sh install
	bash infra/python.sh install
	cargo fetch --locked 2>/dev/null || cargo fetch
	@echo "setup: done"

up: ## start Kafka, Redis, the schema registry and Prometheus on loopback
	bash infra/kafka.sh start
	bash infra/redis.sh start
	bash infra/registry.sh start
	bash infra/prometheus.sh start

down: ## stop everything `make up` started
	-bash infra/prometheus.sh stop
	-bash infra/registry.sh stop
	-bash infra/redis.sh stop
	-bash infra/kafka.sh stop

status: ## say which services are running
	-@bash infra/kafka.sh status
	-@bash infra/redis.sh status
	-@bash infra/registry.sh status
	-@bash infra/prometheus.sh status

health: ## check Kafka, Redis, the schema registry and Prometheus answer; non-zero exit if any does not
	@bash infra/health.sh

build: ## build the sfs binary (release)
	cargo build --release --bin sfs

test: ## fmt check, clippy -D warnings, all unit and integration tests against real Kafka and Redis
	bash infra/test.sh

demo: ## generate traffic, stream features into Redis, score requests end to end
	bash infra/demo.sh

inspect: ## one terminal screen of the running job, Redis and server (sfs inspect)
	@test -x $(SFS) || cargo build --release --bin sfs
	$(SFS) inspect

logs: ## tail the stream job and server logs (.data/logs)
	@mkdir -p .data/logs; ls .data/logs/*.log >/dev/null 2>&1 || { echo "no logs in .data/logs yet: run make demo first"; exit 1; }
	tail -n 50 -F .data/logs/*.log

monitor: ## start Prometheus with the alerting rules loaded; print its URL
	bash infra/prometheus.sh start
	@echo "Prometheus: http://127.0.0.1:$${PROMETHEUS_PORT:-9090} (alerts: http://127.0.0.1:$${PROMETHEUS_PORT:-9090}/alerts, rules: infra/prometheus/rules.yml)"

train: ## generate a 30-day log, backfill it, train + register (MLflow) + publish the models (TRAIN_DAYS, TRAIN_USERS)
	bash infra/train.sh run

mlflow: ## serve the MLflow UI of `make train` runs on 127.0.0.1:5000
	bash infra/train.sh mlflow

fmt: ## format the Rust code
	cargo fmt --all

lint: ## rustfmt check and clippy with warnings denied
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

bench: ## run every benchmark under bench/ (JSON lines to stdout and bench/out/)
	bash bench/run-all.sh

clean: ## stop services, remove build output and local data (.data, .venv kept unless CLEAN_ALL=1)
	-$(MAKE) down
	cargo clean
	rm -rf .data bench/out
	if [ "$(CLEAN_ALL)" = 1 ]; then rm -rf .venv; fi
