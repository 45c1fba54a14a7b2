#!/usr/bin/env bash
# diffuse-synth with candle's CUDA backend (cargo feature `cuda`), built on a machine
# without a CUDA toolkit or GPU:
#
#   tools/diffuse-synth/cuda/build.sh check     # clippy -D warnings of the cuda build (CI: make cuda-check)
#   tools/diffuse-synth/cuda/build.sh build     # target/cuda/release/diffuse-synth
#   tools/diffuse-synth/cuda/build.sh test ARGS # cargo test -p diffuse-synth --features cuda ARGS
#
# Three things stock crates do not give, set up here without touching the workspace:
# 1. nvcc: candle-kernels compiles its .cu files to PTX at build time. The cu12 nvcc wheel
#    ships only ptxas; the CUDA 13.0 wheels ship nvcc (+ nvvm, crt, cudart and cccl
#    headers). Installed into ~/.cache/ftk/nvcc-<pins hash>. The PTX they emit (ISA 9.0) needs a driver
#    for CUDA 13.0 or newer (R580+) on the GPU machine.
# 2. candle-core 0.11.1 asks cudarc for `dynamic-linking` (libcuda, cuBLAS... needed to
#    start the binary; cudarc's build refuses it next to ftk's `dynamic-loading`): a copy
#    with `dynamic-loading` instead, so the binary starts anywhere and `auto` falls back.
# 3. candle-kernels 0.11.1 also builds GGUF MoE kernels into a static library linked
#    with libcudart: a copy whose build.rs builds only the PTX modules (cuda/candle-kernels-build.rs).
# The copies live in target/cuda-patch and are passed to cargo as [patch] through
# --config; Cargo.lock is put back afterwards (the patch rewrites candle's entries).
set -euo pipefail
cd "$(dirname "$0")/../../.."
ROOT=$PWD
mode=${1:-check}
shift || true

PY=${PYTHON:-python3}
PINS="nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85"
# Outside the clone, keyed by the pins (as the Makefile's Python venv): CI's fresh clones
# download the ~150 MB of wheels once per machine, not once per run.
VENV=${FTK_NVCC_VENV:-${HOME}/.cache/ftk/nvcc-$(echo "$PINS" | sha256sum | cut -c1-12)}
STAMP=$VENV/.installed
if [ ! -f "$STAMP" ]; then
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install -q --no-cache-dir $PINS
  touch "$STAMP"
fi
CU=$(echo "$VENV"/lib/python3*/site-packages/nvidia/cu13)
export PATH="$CU/bin:$PATH"
# PTX for sm_80 runs on Ampere, Hopper and later (the driver JIT-compiles it once).
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-80}
# the workspace target dir: dependencies unaffected by the feature are shared with the CPU build

cargo fetch --locked -q
REG=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/candle-core-0.11.1 | head -1)
REG=$(dirname "$REG")
P=$ROOT/target/cuda-patch
if [ ! -f "$P/.done-1" ]; then
  rm -rf "$P"
  mkdir -p "$P"
  cp -r "$REG/candle-core-0.11.1" "$P/candle-core"
  cp -r "$REG/candle-kernels-0.11.1" "$P/candle-kernels"
  sed -i 's/"dynamic-linking",/"dynamic-loading",/' "$P/candle-core/Cargo.toml"
  grep -q '"dynamic-loading",' "$P/candle-core/Cargo.toml"
  cp "$ROOT/tools/diffuse-synth/cuda/candle-kernels-build.rs" "$P/candle-kernels/build.rs"
  touch "$P/.done-1"
fi

cp Cargo.lock "$P/Cargo.lock.orig"
restore() { cp "$P/Cargo.lock.orig" "$ROOT/Cargo.lock"; }
trap restore EXIT
CFG=(--config "patch.crates-io.candle-core.path=\"$P/candle-core\""
     --config "patch.crates-io.candle-kernels.path=\"$P/candle-kernels\"")
case $mode in
  check) cargo clippy "${CFG[@]}" -p diffuse-synth --features cuda --all-targets -- -D warnings ;;
  build) cargo build "${CFG[@]}" --release -p diffuse-synth --features cuda
         echo "built ${CARGO_TARGET_DIR:-target}/release/diffuse-synth" ;;
  test)  cargo test "${CFG[@]}" -p diffuse-synth --features cuda "$@" ;;
  *) echo "usage: $0 check|build|test [cargo test args]" >&2; exit 2 ;;
esac
