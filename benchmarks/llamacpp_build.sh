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
cmake -S "$SRC" -B "$SRC/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF \
  -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
cmake --build "$SRC/build" -j"$(nproc)" --target llama-quantize llama-perplexity llama-imatrix llama-bench llama
echo "LLMPRESS_LLAMA_CPP=$DIR/$SRC/build/bin"
echo "LLMPRESS_LLAMA_CPP_PY=$DIR/llama_cpp_python-$VERSION:$DIR/pylib"
