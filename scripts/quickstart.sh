#!/usr/bin/env bash
# The main job on the embedded default model: set up ./.venv, prune SmolLM2-135M-Instruct (Q4_1)
# to 2:4 with ARMOR at the library's defaults but 10 iterations (output-aware objective, 10 %
# wrapper budget, 20 decoder-layer reconstruction steps) through llm-compressor's oneshot, save it
# as armor-ct, reload it with from_pretrained, and print WikiVital-test and PTB-test perplexity
# next to the dense model and llm-compressor's SparseGPT 2:4 on the same calibration data, with
# timings. Offline after set-up; 15-40 min on 2 cores, with other jobs on them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
results=${ARMOR_RESULTS:-out/quickstart.jsonl}
mkdir -p "$(dirname "$results")"
rm -f "$results"
exec "${ARMOR_VENV:-.venv}/bin/python" benchmarks/smollm2_side_by_side.py \
  --methods dense sparsegpt armor-defaults-it10 --eval-windows 16 --save-reload \
  --results "$results" "$@"
