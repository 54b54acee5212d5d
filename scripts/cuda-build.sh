#!/usr/bin/env bash
# Builds prefcap's `--features cuda` release binary on a machine with neither a GPU nor a CUDA
# toolkit, for scripts/gpu-check.sh to run on a lent GPU machine (which has no Rust).
#
# - nvcc 13.0, its headers, nvvm, cccl and the CUDA runtime come from NVIDIA's PyPI wheels,
#   unpacked into one toolkit folder (.cuda unless CUDA_TOOLKIT_DIR says otherwise).
# - cudarc links libcuda, cuBLAS, cuBLASLt and cuRAND dynamically; none of them is in those
#   wheels, so the link uses stub libraries with the real sonames and every function name cudarc
#   declares. At run time the GPU machine's driver and PyTorch's CUDA 13 wheels provide the real
#   ones (gpu-check.sh finds them). The stubs are never loaded: the binary has no rpath.
# - The result is stripped and xz-compressed to .gpu/pipeline.xz, and the GPU tests
#   (tests/gpu.rs) to .gpu/gpu-tests.xz (carry ".gpu" to the device).
#   target/release/pipeline is then the CUDA build, which needs libcuda to start; a plain
#   `cargo build --release` puts the CPU one back (its artifacts are kept beside).
#
# Usage (repo root or anywhere): bash scripts/cuda-build.sh   [PYTHON=python-with-pip]
# CUDA_COMPUTE_CAP defaults to 90 (H100/H200). Set CARGO_TARGET_DIR as for any build.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tk=${CUDA_TOOLKIT_DIR:-$root/.cuda}
py=${PYTHON:-python3}
version=13.0

if [ ! -x "$tk/bin/nvcc" ]; then
  echo "cuda-build: fetching the CUDA $version compiler and runtime wheels from PyPI"
  wheels=$(mktemp -d)
  trap 'rm -rf "$wheels"' EXIT
  "$py" -m pip download --no-deps -q -d "$wheels" \
    "nvidia-cuda-nvcc==$version.*" "nvidia-cuda-runtime==$version.*" "nvidia-cuda-crt==$version.*" \
    "nvidia-cuda-nvrtc==$version.*" "nvidia-nvvm==$version.*" "nvidia-cuda-cccl==$version.*"
  for w in "$wheels"/*.whl; do "$py" -m zipfile -e "$w" "$wheels/unpacked"; done
  mkdir -p "$tk.partial"
  cp -a "$wheels/unpacked/nvidia/cu13/." "$tk.partial/"
  chmod +x "$tk.partial"/bin/* "$tk.partial"/nvvm/bin/*
  rm -rf "$tk" && mv "$tk.partial" "$tk"
fi

# Link stubs, named and versioned like the real libraries, in a folder cudarc searches.
cargo fetch --manifest-path "$root/Cargo.toml" -q
cudarc=$(cargo metadata --manifest-path "$root/Cargo.toml" --format-version 1 --features cuda \
  | "$py" -c 'import json,sys,os; m=json.load(sys.stdin); print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"]=="cudarc"))')
stubs="$tk/lib/stubs"
mkdir -p "$stubs"
stub() { # stub LIB SONAME MODULE PREFIX
  local c="$stubs/$1.c"
  grep -ohE "fn $4[A-Za-z0-9_]*\(" "$cudarc/src/$3/sys/mod.rs" | sed -E 's/^fn (.*)\($/void \1(void) {}/' \
    | sort -u > "$c"
  [ -s "$c" ] || { echo "cuda-build: no $4* functions found in cudarc's $3 bindings" >&2; exit 1; }
  cc -shared -fPIC -Wl,-soname,"$2" -o "$stubs/lib$1.so" "$c"
}
stub cuda libcuda.so.1 driver cu
stub cublas libcublas.so.13 cublas cublas
stub cublasLt libcublasLt.so.13 cublaslt cublasLt
stub curand libcurand.so.10 curand curand
# nvrtc and the runtime (candle's MoE kernels link it) are real, from the wheels; the linker
# wants their unversioned names.
ln -sf libnvrtc.so.13 "$tk/lib/libnvrtc.so"
ln -sf libcudart.so.13 "$tk/lib/libcudart.so"

export CUDA_HOME="$tk" PATH="$tk/bin:$PATH" CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
cargo build --manifest-path "$root/Cargo.toml" --release --features cuda,bench --bin pipeline
target=${CARGO_TARGET_DIR:-$root/target}
# The GPU tests (tests/gpu.rs), as one executable: cargo prints its path.
tests=$(cargo test --manifest-path "$root/Cargo.toml" --release --features cuda --test gpu \
  --no-run --message-format=json \
  | "$py" -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "gpu" and m.get("executable"):
        print(m["executable"])')
[ -x "$tests" ] || { echo "cuda-build: the GPU test executable was not built" >&2; exit 1; }
mkdir -p "$root/.gpu"
pack() { # pack EXECUTABLE NAME: stripped and xz-compressed to .gpu/NAME.xz
  strip -o "$root/.gpu/$2" "$1"
  xz -T2 -6 -c "$root/.gpu/$2" > "$root/.gpu/$2.xz.partial"
  mv "$root/.gpu/$2.xz.partial" "$root/.gpu/$2.xz"
  rm "$root/.gpu/$2"
  echo "cuda-build: $(du -h "$root/.gpu/$2.xz" | cut -f1) .gpu/$2.xz from $(git -C "$root" rev-parse --short HEAD)$(git -C "$root" diff --quiet || echo ' + uncommitted changes')"
}
pack "$target/release/pipeline" pipeline
pack "$tests" gpu-tests
