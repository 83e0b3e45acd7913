#!/usr/bin/env bash
# Install nmoe-flwr and its data on Debian with Python 3.11 (registries only, no other internet).
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi
# Fashion-MNIST IDX files -> /usr/share/datasets/fashion-mnist
if [ ! -e /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then
  $SUDO apt-get install -y -q dataset-fashion-mnist || { $SUDO apt-get update -q && $SUDO apt-get install -y -q dataset-fashion-mnist; }
fi
python -m pip install -q --upgrade pip
# torch first and pinned: 2.13.0 is the local CPU wheel; an unpinned torch pulls GBs of CUDA.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
python -c "import torch, flwr, ray; print('torch', torch.__version__, '| flwr', flwr.__version__, '| ray', ray.__version__)"
