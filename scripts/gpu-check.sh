#!/usr/bin/env bash
# GPU checks and benchmarks on a lent CUDA machine, from a prefcap binary built elsewhere with
# `--features cuda` (CUDA_COMPUTE_CAP=90), stripped and xz-compressed to .gpu/pipeline.xz.
# Usage (on the GPU machine, repo root): bash scripts/gpu-check.sh [steps...]
# Steps: env tests embed-bf16 embed-bf16-256 embed-f32 train-sft train-dpo run embed-f16
# (default: all, in that order). `tests` runs tests/gpu.rs (.gpu/gpu-tests.xz, built by
# cuda-build.sh) from the repository root. Logs go to $OUT.
set -u
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
steps=${*:-env tests embed-bf16 embed-bf16-256 embed-f32 train-sft train-dpo run embed-f16}
# The CUDA libraries the binary links: the driver's libcuda and the toolkit's (PyTorch's wheels).
libdirs=$(find /usr/local/nvidia /usr/lib/x86_64-linux-gnu /usr/local/cuda* /opt \
  \( -name 'libcuda.so.1' -o -name 'libcublas.so.13' -o -name 'libcublasLt.so.13' \
  -o -name 'libcurand.so.10' -o -name 'libnvrtc.so.13' -o -name 'libcudart.so.13' \) \
  2>/dev/null | grep -v /compat/ | xargs -r -n1 dirname | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:-}"
bin=/tmp/pipeline
{ python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" .gpu/pipeline.xz $bin && chmod +x $bin; }
# The machine's own Python (PyTorch, transformers) as the peers' "venv"; a wrapper, not a
# symlink, so that Python still finds its own environment.
mkdir -p /tmp/pyenv/bin && printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" > /tmp/pyenv/bin/python
chmod +x /tmp/pyenv/bin/python
export RUST_BACKTRACE=1 PREFCAP_QUIET=1
run() { local name=$1 limit=$2; shift 2; echo "=== $name: $*"; local t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  tail -n 25 "$OUT/$name.log"; echo "=== $name rc=$rc in $(( $(date +%s) - t0 )) s"; }
for s in $steps; do case $s in
  env) nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
       echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"; ldd $bin | grep -E "not found|cuda|cublas|curand|nvrtc"
       nproc; python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"
       python3 -c "import trl, datasets; print('trl', trl.__version__)" || echo "no TRL here" ;;
  tests) python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" .gpu/gpu-tests.xz /tmp/gpu-tests \
       && chmod +x /tmp/gpu-tests && run gpu-tests 240 /tmp/gpu-tests --test-threads=1 --nocapture ;;
  embed-bf16) run embed-bf16 150 $bin bench embed --gpu 0 --dtype bf16 --images 1024 --batch 512 --scale 16 --profile --venv /tmp/pyenv --dir /tmp/be ;;
  embed-bf16-256) run embed-bf16-256 90 $bin bench embed --gpu 0 --dtype bf16 --images 8192 --batch 512 --scale 2 --source-size 256x256 --no-peer --dir /tmp/be ;;
  embed-f16) run embed-f16 90 $bin bench embed --gpu 0 --dtype f16 --images 4096 --batch 512 --scale 4 --no-peer --dir /tmp/be ;;
  embed-f32) run embed-f32 120 $bin bench embed --gpu 0 --dtype f32 --images 2048 --batch 256 --scale 1 --venv /tmp/pyenv --dir /tmp/be ;;
  train-sft) run train-sft 120 $bin bench train-sft --gpu 0 --batch 32 --tokens 32 --steps 10 --venv /tmp/pyenv --dir /tmp/bt
       ;;
  train-dpo) peer=--no-peer; python3 -c "import trl, datasets" 2>/dev/null && peer=""
       run train-dpo 240 $bin bench train-dpo --gpu 0 --pairs 256 --batch 16 $peer --venv /tmp/pyenv --dir /tmp/bd
       ;;
  run) mkdir -p /tmp/wd && run pipeline-run 150 $bin run --gpu 0 --workdir /tmp/wd
       cp /tmp/wd/runs/*/scores_summary.parquet "$OUT/" 2>/dev/null ;;
esac; done
