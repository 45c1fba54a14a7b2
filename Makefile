# ftk: `make demo` builds and runs every tool on embedded defaults and testdata;
# `make test` is what CI runs (.ci/run). Nothing here needs Python except
# `make bench` and `make gen`, which create .venv themselves.

CARGO ?= cargo
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BIN := target/release
MIXTRAL := testdata/configs/mixtral-8x7b/config.json
MODEL2 := testdata/mem-plan/memfine-model2.json

.PHONY: all build demo test lint bench gen clean

all: build

build:
	$(CARGO) build --release --workspace

demo: build
	@echo "== route-hist: synthetic Zipf(1.2) routing for Mixtral-8x7B, 8 EP ranks =="
	$(BIN)/route-hist --synthetic zipf:1.2 --model $(MIXTRAL) --tokens 32768 --layers 4 --ep 8 --capacity-factor 1.25 --seed 1 --table
	@echo
	@echo "== route-hist: router logits (bf16) from a checked-in trace, softmax + top-2 =="
	$(BIN)/route-hist --model $(MIXTRAL) --ep 2 --capacity-factor 1.25 testdata/route-hist/logits_bf16_e8_k2.safetensors --table
	@echo
	@echo "== route-hist | mem-plan: MACT picks chunks per pipeline stage for a 24 GiB device =="
	$(BIN)/route-hist --synthetic zipf:1.2 --model $(MIXTRAL) --tokens 32768 --ep 8 --seed 1 \
	  | $(BIN)/mem-plan --model $(MIXTRAL) --tp 2 --pp 4 --ep 8 --dp 8 --zero 1 --seq 32768 --device-mem 24GiB --table
	@echo
	@echo "== mem-plan: MemFine Model II what-if (Table 4: 22.9 GB full recompute, 11.9 GB at C=2) =="
	$(BIN)/mem-plan --model $(MODEL2) --ep 32 --dp 32 --tokens-received 597500 --chunks 2 --uniform \
	  | head -1

test:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) test --workspace

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

$(VENV)/.installed: testdata/gen/requirements.txt bench/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r testdata/gen/requirements.txt -r bench/requirements.txt
	touch $@

# Side-by-side benchmarks: ftk against its peer in the same run, one JSON line each.
bench: build $(VENV)/.installed
	$(PY) bench/route_hist_bench.py

# Regenerate the reference fixtures to a temp dir and byte-compare with testdata/.
gen: $(VENV)/.installed
	$(PY) testdata/gen/route_hist_ref.py gen --check

clean:
	$(CARGO) clean
