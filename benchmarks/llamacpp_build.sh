#!/bin/bash
# Builds llama.cpp's tools and library from the llama-cpp-python source distribution (it vendors
# llama.cpp), for benchmarks/gguf_llamacpp.py and tests/export/test_gguf_llamacpp.py. Nothing
# here is a dependency of llmpress. Usage: benchmarks/llamacpp_build.sh [DIR] (default
# runs/llamacpp); prints the two variables the test and the benchmark read.
set -euo pipefail
DIR=$(realpath -m "${1:-runs/llamacpp}")
VERSION=0.3.36
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$DIR"
cd "$DIR"
[ -f llama_cpp_python-$VERSION.tar.gz ] || "$OLDPWD/$PY" -m pip download llama-cpp-python==$VERSION --no-binary :all: --no-deps -d .
[ -d llama_cpp_python-$VERSION ] || tar xzf llama_cpp_python-$VERSION.tar.gz
# the converter's tokenizer probe imports sentencepiece; the Python bindings import diskcache
[ -d pylib/sentencepiece ] || "$OLDPWD/$PY" -m pip install -q --target pylib sentencepiece==0.2.3 diskcache==5.6.3
SRC=llama_cpp_python-$VERSION/vendor/llama.cpp
# Not GGML_NATIVE: on a VM that advertises AMX without granting it (this project's machine),
# -march=native code traps with "illegal instruction"; the x86 extensions are named instead,
# AVX-512 only where /proc/cpuinfo lists it.
ISA="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
grep -qw avx_vnni /proc/cpuinfo && ISA="$ISA -DGGML_AVX_VNNI=ON"
grep -qw avx512f /proc/cpuinfo && ISA="$ISA -DGGML_AVX512=ON"
grep -qw avx512_vnni /proc/cpuinfo && ISA="$ISA -DGGML_AVX512_VNNI=ON"
grep -qw avx512_bf16 /proc/cpuinfo && ISA="$ISA -DGGML_AVX512_BF16=ON"
grep -qw avx512vbmi /proc/cpuinfo && ISA="$ISA -DGGML_AVX512_VBMI=ON"
# shellcheck disable=SC2086
cmake -S "$SRC" -B "$SRC/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF \
  -DLLAMA_OPENSSL=OFF $ISA -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
cmake --build "$SRC/build" -j"$(nproc)" --target llama-quantize llama-perplexity llama-imatrix llama-bench llama
echo "LLMPRESS_LLAMA_CPP=$DIR/$SRC/build/bin"
echo "LLMPRESS_LLAMA_CPP_PY=$DIR/llama_cpp_python-$VERSION:$DIR/pylib"
