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
LLAMA70B := testdata/configs/llama-3-70b/config.json

.PHONY: all build demo test test-python lint machete bench gen clean fuzz cuda-check cuda-build

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
	  | $(BIN)/mem-plan --model $(MIXTRAL) --hist - --tp 2 --pp 4 --ep 8 --dp 8 --zero 1 --seq 32768 --device-mem 24GiB --table
	@echo
	@echo "== mem-plan: MemFine Model II what-if (Table 4: 22.9 GB full recompute, 11.9 GB at C=2) =="
	$(BIN)/mem-plan --model $(MODEL2) --ep 32 --dp 32 --tokens-received 597500 --chunks 2 --uniform \
	  | head -1

	@echo
	@echo "== chunk-run: one expert gets 45% of the tokens; none / full / chunked (FCDA) / auto (MACT) =="
	$(BIN)/chunk-run --hidden 512 --ffn 1408 --experts 8 --topk 2 --tokens 2048 --layers 4 \
	  --synthetic hot:0.45 --recompute none,full,chunked:2,chunked:4,auto --device-mem 900MiB --alpha 1 --table
	@echo
	@echo "== mofa-predict: Llama-3-70B-class dense run and Mixtral-class MoE run on 1024 H100s =="
	$(BIN)/mofa-predict --model $(LLAMA70B) --seq 8192 --cluster H100 --gpus 1024 \
	  --strategy tp=8,pp=4,vpp=2,mbs=1,gbs=1024,recompute=selective,zero=1 --tokens 15e12 --table
	$(BIN)/mofa-predict --model $(MIXTRAL) --seq 4096 --cluster H100 --gpus 1024 \
	  --strategy tp=2,pp=4,ep=8,mbs=1,gbs=1024,recompute=selective,zero=1 --tokens 1e12 --table
	@echo
	@echo "== mofa-predict tune: the best strategies for the Mixtral-class run =="
	$(BIN)/mofa-predict tune --model $(MIXTRAL) --seq 4096 --cluster H100 --gpus 1024 --gbs 1024 --top 5 --tokens 1e12 --table

	@echo
	@echo "== fed-aggregate: FedAvg of 9 clients, then 3 FedAdam rounds with server state (Flower-checked fixtures) =="
	@mkdir -p target/demo && cp testdata/fed-aggregate/global0.safetensors target/demo/g.safetensors && rm -f target/demo/opt.safetensors
	$(BIN)/fed-aggregate --strategy fedavg -o target/demo/fedavg.safetensors testdata/fed-aggregate/m_r1_9.jsonl
	for r in 1 2 3; do $(BIN)/fed-aggregate --strategy fedadam --global target/demo/g.safetensors \
	  --state target/demo/opt.safetensors $$([ $$r = 1 ] && echo --init-state) -o target/demo/g.safetensors testdata/fed-aggregate/m_r$${r}_5.jsonl; done
	@echo
	@echo "== fed-aggregate: FedRA allocation, then layer-wise LoRA aggregation over the clients holding each layer =="
	$(BIN)/fed-aggregate fedra-alloc --clients 6 --layers 12 --capacity 12,10,8,6,4,3 --round 1 --seed 0 | head -2
	$(BIN)/fed-aggregate --strategy fedra --alloc testdata/fed-aggregate/fedra_alloc.jsonl --layer-pattern 'blocks\.(\d+)\.' \
	  --global testdata/fed-aggregate/fedra_global.safetensors -o target/demo/fedra.safetensors testdata/fed-aggregate/m_fedra.jsonl
	@echo
	@echo "== fed-aggregate: 2-level tree: 3 leaf partials of 3 clients, merged ((p0 p1) p2) =="
	cd testdata/fed-aggregate && for i in 0 1 2; do sed -n "$$((3*i+1)),$$((3*i+3))p" m_r1_9.jsonl \
	  | ../../$(BIN)/fed-aggregate --strategy fedavg --partial-out ../../target/demo/p$$i.safetensors; done
	$(BIN)/fed-aggregate merge --partial-out target/demo/p01.safetensors target/demo/p0.safetensors target/demo/p1.safetensors
	$(BIN)/fed-aggregate merge -o target/demo/tree.safetensors target/demo/p01.safetensors target/demo/p2.safetensors

	@echo
	@echo "== fed-embed: FedDISC round on the digits domains (prototypes -> pseudo-labels -> k-means -> noise) =="
	@mkdir -p target/demo
	$(BIN)/fed-embed prototypes --features testdata/fed-embed/server.safetensors -o target/demo/protos.safetensors
	$(BIN)/fed-embed pseudo-label --prototypes target/demo/protos.safetensors --features testdata/fed-embed/client0.safetensors -o target/demo/pl0.safetensors --table
	$(BIN)/fed-embed cluster --features testdata/fed-embed/client0.safetensors --labels target/demo/pl0.safetensors --k 5 --seed 0 -o target/demo/c0.safetensors --table
	$(BIN)/fed-embed noise --features target/demo/c0.safetensors --clip 4 --sigma 8 --seed 0 -o target/demo/up0.safetensors --table
	@echo
	@echo "== fed-embed: FedD3A client subspaces -> per-sample teacher weights on mixed-domain server data =="
	for k in 0 1 2; do $(BIN)/fed-embed subspace --features testdata/fed-embed/client$$k.safetensors --energy 0.9 -o target/demo/b$$k.safetensors; done
	$(BIN)/fed-embed d3a-weights --basis target/demo/b0.safetensors --basis target/demo/b1.safetensors --basis target/demo/b2.safetensors \
	  --features testdata/fed-embed/d3a_server.safetensors -o target/demo/w.safetensors --table

	@echo
	@echo "== diffuse-synth: tiny random SD (diffusers-checked), DPM++ 2M Karras, CFG 3 -> PNGs + manifest =="
	@mkdir -p target/demo
	$(BIN)/diffuse-synth --model testdata/diffuse-synth/tiny-sd --scheduler dpmpp-2m --karras --steps 10 --guidance-scale 3 \
	  --prompt-embeds testdata/diffuse-synth/pipeline.safetensors --seed 7 --batch 2 --class 1 --client c0 \
	  -o target/demo/synth.safetensors --png-dir target/demo/synth-png
	@echo "== diffuse-synth: FedCADO classifier + BN guidance, 10 noise-editing steps (DDPM) =="
	$(BIN)/diffuse-synth --model testdata/diffuse-synth/tiny-sd --scheduler ddpm --steps 10 --guidance-scale 3 \
	  --prompt-embeds testdata/diffuse-synth/pipeline.safetensors --seed 7 --batch 2 \
	  --classifier testdata/diffuse-synth/classifier.safetensors --classifier-arch testdata/diffuse-synth/classifier.json \
	  --class 1 --classifier-size 12 -o target/demo/fedcado.safetensors --png-dir target/demo/fedcado-png
	@echo "== diffuse-synth: FedCADO guidance from a torchvision ResNet-18 state_dict (narrow, torchvision-checked) =="
	$(BIN)/diffuse-synth --model testdata/diffuse-synth/tiny-sd --scheduler ddpm --steps 10 --guidance-scale 3 \
	  --prompt-embeds testdata/diffuse-synth/pipeline.safetensors --seed 7 --batch 2 --noise-edit-steps 2 \
	  --classifier testdata/diffuse-synth/resnet18-narrow.safetensors --classifier-arch resnet18 --class 3 \
	  --classifier-size 36 -o target/demo/fedcado-resnet.safetensors --png-dir target/demo/fedcado-resnet-png
	@echo "== diffuse-synth: FedDISC on a tiny Stable-unCLIP: uploads re-noised to 200, 3-branch guidance at 2, PNDM v-pred =="
	$(BIN)/diffuse-synth --model testdata/diffuse-synth/tiny-unclip --prompt-embeds testdata/diffuse-synth/unclip.safetensors \
	  --image-embeds testdata/diffuse-synth/feddisc.safetensors --class 1 --global-embeds testdata/diffuse-synth/feddisc.safetensors \
	  --global-embeds testdata/diffuse-synth/feddisc-client1.safetensors --seed 7 --batch 2 --client c0 \
	  -o target/demo/feddisc.safetensors --png-dir target/demo/feddisc-png
	@echo "== diffuse-synth: FedDEO description learning, then u + 3(text-u) + 3(desc-u) =="
	$(BIN)/diffuse-synth describe --model testdata/diffuse-synth/tiny-sd --images testdata/diffuse-synth/describe.safetensors \
	  --init testdata/diffuse-synth/describe.safetensors --lr 10 --seed 0 -o target/demo/desc.safetensors
	$(BIN)/diffuse-synth --model testdata/diffuse-synth/tiny-sd --scheduler ddpm --steps 10 --guidance-scale 3,3 \
	  --prompt-embeds testdata/diffuse-synth/pipeline.safetensors --prompt-embeds target/demo/desc.safetensors \
	  --seed 7 --batch 2 --final x0 -o target/demo/feddeo.safetensors --png-dir target/demo/feddeo-png
	@echo "== diffuse-synth: --prompt through the tiny CLIP text encoder (transformers-checked), CFG 3 =="
	$(BIN)/diffuse-synth --model testdata/diffuse-synth/tiny-sd --scheduler ddim --steps 10 --guidance-scale 3 \
	  --prompt "a photo of a cat" --negative-prompt "blurry" --seed 7 --batch 2 \
	  -o target/demo/prompt.safetensors --png-dir target/demo/prompt-png

# libnvrtc from PyPI (no GPU, no CUDA toolkit): every kernel in kernels/ must compile.
NVRTC_VENV := .venv-nvrtc
$(NVRTC_VENV)/.installed:
	$(PYTHON) -m venv $(NVRTC_VENV)
	$(NVRTC_VENV)/bin/pip install -q nvidia-cuda-nvrtc-cu12==12.9.86
	touch $@

# diffuse-synth with candle's CUDA backend (cargo feature `cuda`): nvcc from the CUDA 13.0
# wheels (venv in ~/.cache/ftk), candle patched to load the CUDA libraries at run time (see
# tools/diffuse-synth/cuda/build.sh). `make test` runs cuda-check (candle's PTX kernels
# compiled by nvcc, clippy of the cuda code; about 1.5 CPU-minutes over a warm target).
# No GPU needed for either; bench/diffuse_synth_gpu.py runs the result on one.
cuda-check:
	tools/diffuse-synth/cuda/build.sh check

cuda-build:
	tools/diffuse-synth/cuda/build.sh build

# cargo-machete: `make test` fails on a dependency no source file uses. Installed once
# into $(CARGO_HOME)/bin at a pinned version (it runs on stable; cargo-udeps needs nightly).
CARGO_HOME ?= $(HOME)/.cargo
MACHETE_VERSION := 0.9.2
MACHETE := $(CARGO_HOME)/bin/cargo-machete
MACHETE_STAMP := $(CARGO_HOME)/bin/.cargo-machete-$(MACHETE_VERSION)
$(MACHETE_STAMP):
	$(CARGO) install cargo-machete --locked --version $(MACHETE_VERSION)
	touch $@

machete: $(MACHETE_STAMP)
	$(MACHETE)

test: $(NVRTC_VENV)/.installed machete
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	LD_LIBRARY_PATH="$$(echo $(CURDIR)/$(NVRTC_VENV)/lib/python3*/site-packages/nvidia/cuda_nvrtc/lib)" \
	  FTK_REQUIRE_NVRTC=1 $(CARGO) test --workspace
	$(MAKE) cuda-check
	$(MAKE) test-python

# python/ (ftk.flwr, ftk.trace) against real Flower and transformers. The venv is
# built from pinned versions OUTSIDE the clone, keyed by the requirements' hash, so
# CI installs torch (~3 GB, CUDA build) once per pin set, not once per run or clone.
PY_REQS := python/requirements-test.txt
PY_VENV ?= $(HOME)/.cache/ftk/venv-$(shell sha256sum $(PY_REQS) | cut -c1-16)
# No prerequisite on the file itself: its content is in the name, and a fresh clone's
# newer mtime must not rebuild a venv made from the same pins.
$(PY_VENV)/.installed:
	rm -rf $(PY_VENV)
	$(PYTHON) -m venv $(PY_VENV)
	$(PY_VENV)/bin/pip install -q -r $(PY_REQS)
	touch $@

# The debug binaries `cargo test` just built serve the tests (no release build).
# `cargo test --workspace --no-run` is a no-op after `make test`'s own test run;
# a `cargo build -p ...` of a package subset resolves other dependency features and
# recompiled the whole dependency tree (5 minutes of CI).
test-python: $(PY_VENV)/.installed
	$(CARGO) test --workspace --no-run
	cd python && FTK_BIN=$(CURDIR)/target/debug PYTHONPATH=$(CURDIR)/python \
	  $(PY_VENV)/bin/python -m pytest -q -p no:cacheprovider --durations=5 tests

# Fuzzing on stable: FTK_FUZZ_COUNT inputs per parser target (seeded by
# FTK_FUZZ_SEED); `make test` runs a short smoke of the same targets.
FTK_FUZZ_COUNT ?= 1000000
FTK_FUZZ_SEED ?= 0
fuzz:
	$(CARGO) build --release --workspace
	FTK_FUZZ_COUNT=$(FTK_FUZZ_COUNT) FTK_FUZZ_SEED=$(FTK_FUZZ_SEED) \
	  $(CARGO) test --release -p ftk-checks --test fuzz -- --ignored fuzz --nocapture

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
	$(PY) bench/chunk_run_bench.py
	$(PY) bench/fed_aggregate_bench.py
	$(PY) bench/fed_embed_bench.py
	$(PY) bench/diffuse_synth_bench.py
	$(PY) bench/diffuse_synth_bench.py --case fedcado --case describe
	$(PY) bench/diffuse_synth_bench.py --case fedcado --case describe --threads 1
	$(PY) bench/mofa_bench.py
	$(PY) bench/gpu_bench.py
	$(PY) bench/flwr_bench.py

# Regenerate the reference fixtures to a temp dir and byte-compare with testdata/.
gen: $(VENV)/.installed
	$(PY) testdata/gen/route_hist_ref.py gen --check
	$(PY) testdata/gen/fed_aggregate_ref.py gen --check
	$(PY) testdata/gen/fed_embed_ref.py gen --check
	$(PY) testdata/gen/diffuse_synth_ref.py gen --check
	$(PY) testdata/gen/diffuse_synth_unclip_ref.py gen --check
	$(PY) testdata/gen/diffuse_synth_resnet_ref.py gen --check
	$(PY) testdata/gen/diffuse_synth_final_ref.py gen --check

clean:
	$(CARGO) clean
