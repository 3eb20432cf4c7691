#!/usr/bin/env bash
# Set up a fresh clone: a .venv with torch 2.14.1 + torchvision 0.29.1, timm, masksub (editable,
# with test tools and TRL) and the Fashion-MNIST IDX files from Debian's dataset-fashion-mnist package.
# Safe to run again: finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# torch and torchvision pinned together first, so nothing later pulls another torch.
if ! "$VENV/bin/python" -c "import torch, torchvision; assert torch.__version__.startswith('2.14.1')" 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1 2>&1 | { grep -v "^WARNING: Location" || true; }
fi
"$VENV/bin/python" -m pip install -q -e ".[dev,trl]" 2>&1 | { grep -v "^WARNING: Location" || true; }
"$VENV/bin/python" -c "import torch, torchvision, timm, masksub; print('torch', torch.__version__, '| torchvision', torchvision.__version__, '| timm', timm.__version__, '| masksub', masksub.__version__)"

if [ -z "${MASKSUB_FASHION_MNIST:-}" ] && [ ! -e /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null; }
fi
echo "setup done: $VENV ready, Fashion-MNIST at ${MASKSUB_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}"
