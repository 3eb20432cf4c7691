#!/usr/bin/env bash
# Run the test suite against other torch / torchvision / timm releases, in a venv of their own.
#   EXTRA="transformers==4.48.3 accelerate==1.1.1 lightning==2.2.0" \
#     bash scripts/test_versions.sh 2.4.0 0.19.0 1.0.20    # the oldest pyproject.toml allows
# EXTRA pins the test extras too: transformers >= 5 installs beside torch < 2.6 but turns its models off.
#   bash scripts/test_versions.sh 2.11.0 0.26.0 1.0.31 -x tests/test_step.py   # extra args go to pytest
# The venv is .venv-torch<T>-timm<M> (or $VENV); run again to reuse it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 3 ]; then
  echo "usage: bash scripts/test_versions.sh TORCH TORCHVISION TIMM [pytest args...]" >&2
  exit 2
fi
TORCH=$1 TORCHVISION=$2 TIMM=$3
shift 3
PY=${PYTHON:-python3}
VENV=${VENV:-.venv-torch$TORCH-timm$TIMM}
quiet() { "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# The pinned releases stay pinned while masksub and its test extras install: without the constraints, a
# newer transformers, Accelerate or Lightning would pull a newer torch over the one under test.
PINS=$(mktemp)
trap 'rm -f "$PINS"' EXIT
printf 'torch==%s\ntorchvision==%s\ntimm==%s\n' "$TORCH" "$TORCHVISION" "$TIMM" > "$PINS"
for pin in ${EXTRA:-}; do echo "$pin" >> "$PINS"; done
quiet "$VENV/bin/python" -m pip install -q -c "$PINS" "torch==$TORCH" "torchvision==$TORCHVISION" "timm==$TIMM"
quiet "$VENV/bin/python" -m pip install -q -c "$PINS" -e ".[dev]"
"$VENV/bin/python" -c "import torch, torchvision, timm, numpy, transformers, accelerate, lightning; print('testing with torch', torch.__version__, '| torchvision', torchvision.__version__, '| timm', timm.__version__, '| numpy', numpy.__version__, '| transformers', transformers.__version__, '| accelerate', accelerate.__version__, '| lightning', lightning.__version__)"
"$VENV/bin/python" -m pytest -q -rs "$@"
