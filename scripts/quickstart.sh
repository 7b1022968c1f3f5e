#!/usr/bin/env bash
# The main job on the embedded default model: set up ./.venv, prune SmolLM2-135M-Instruct (Q4_1)
# to 2:4 with ARMOR (output-aware objective, wrapper block 32, 10 iterations) through
# llm-compressor's oneshot, save it as armor-ct, reload it with from_pretrained, and print
# WikiVital-test and PTB-test perplexity next to the dense model and llm-compressor's SparseGPT
# 2:4 on the same calibration data, with timings. Offline after set-up; ~15-25 min on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
results=${ARMOR_RESULTS:-out/quickstart.jsonl}
mkdir -p "$(dirname "$results")"
rm -f "$results"
exec "${ARMOR_VENV:-.venv}/bin/python" benchmarks/smollm2_side_by_side.py \
  --methods dense sparsegpt armor-output-b32-it10 --eval-windows 16 --save-reload \
  --results "$results" "$@"
