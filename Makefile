# Streaming feature store: the user's entry points. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

export CARGO_TARGET_DIR ?= $(HOME)/.cache/sfs/target
export KAFKA_BROKERS ?= 127.0.0.1:9092
export REDIS_URL ?= redis://127.0.0.1:6379
SFS := $(CARGO_TARGET_DIR)/release/sfs

.PHONY: help setup up down status health build test demo fmt lint bench clean train mlflow

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

setup: ## install Kafka jars, Redis, Prometheus, the Python venv (with ONNX Runtime); fetch crates
	bash infra/kafka.sh install
	bash infra/redis.sh install
	bash infra/prometheus.sh install
	bash infra/python.sh install
	cargo fetch --locked 2>/dev/null || cargo fetch
	@echo "setup: done"

up: ## start Kafka, Redis and Prometheus on loopback
	bash infra/kafka.sh start
	bash infra/redis.sh start
	bash infra/prometheus.sh start

down: ## stop everything `make up` started
	-bash infra/prometheus.sh stop
	-bash infra/redis.sh stop
	-bash infra/kafka.sh stop

status: ## say which services are running
	-@bash infra/kafka.sh status
	-@bash infra/redis.sh status
	-@bash infra/prometheus.sh status

health: ## check Kafka, Redis and Prometheus answer; non-zero exit if any does not
	@bash infra/health.sh

build: ## build the sfs binary (release)
	cargo build --release --bin sfs

test: ## fmt check, clippy -D warnings, all unit and integration tests against real Kafka and Redis
	bash infra/test.sh

demo: ## generate traffic, stream features into Redis, score requests end to end
	bash infra/demo.sh

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
