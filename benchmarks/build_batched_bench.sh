#!/usr/bin/env bash
# llama.cpp's own `llama-batched-bench`, built by build_llama_tools.sh (which see).
#   bash benchmarks/build_batched_bench.sh      -> prints the path of the binary
exec bash "$(dirname "${BASH_SOURCE[0]}")/build_llama_tools.sh" llama-batched-bench
