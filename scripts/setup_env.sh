#!/usr/bin/env bash
# Creates .venv in the repo root with torch, detectron2, this project (editable) and test tools.
# Idempotent: a finished venv is detected by a stamp file and reused.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
PY=${PYTHON:-python3}
STAMP=$VENV/.slim_det_setup_done

# Bump when the package list changes, so existing venvs pick up new packages.
SETUP_VERSION=4
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$SETUP_VERSION" ]; then
  exit 0
fi

echo "[setup] preparing $VENV with $($PY --version)"
if [ ! -x $VENV/bin/python ]; then
  # A detectron2 the user already built (e.g. upstream from source) stays usable: the venv then
  # sees the interpreter's packages, and the install below keeps that detectron2 and its torch.
  if $PY -c 'import detectron2.modeling' 2>/dev/null; then
    echo "[setup] keeping the detectron2 that $PY already imports"
    $PY -m venv --system-site-packages $VENV
  else
    $PY -m venv $VENV
  fi
fi
VPY=$VENV/bin/python

# pip, minus the warnings this machine's pip config prints for local index folders it lacks.
pipq() {
  "$VPY" -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}

pipq install -q --upgrade pip

if ! $VPY -c 'import torch, torchvision' 2>/dev/null; then
  echo "[setup] installing torch + torchvision"
  pipq install -q torch==2.14.1 torchvision==0.29.1
fi

pipq install -q 'setuptools<81' fvcore iopath pycocotools 'omegaconf>=2.1,<2.4' 'hydra-core>=1.1' \
  yacs termcolor tabulate cloudpickle matplotlib tqdm Pillow opencv-python-headless packaging \
  tensorboard pytest pytest-timeout onnx onnxruntime sphinx

# Keep a detectron2 that already imports (for example, upstream built from source). Otherwise
# install the PyPI snapshot wheel; it is tagged cp310 but its Python code runs on newer CPython.
if ! $VPY -c 'import detectron2.modeling' 2>/dev/null; then
  echo "[setup] installing detectron2 (sal-detectron2 wheel)"
  SP=$($VPY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  pipq install -q --upgrade --no-deps --only-binary=:all: --python-version 3.10 \
    --target "$SP" sal-detectron2==0.7.2
  # The wheel ships a top-level 'tools' package that would shadow ours, and a _C built for 3.10.
  rm -rf "$SP/tools" "$SP"/detectron2/_C.cpython-310-*.so
fi

# detectron2's COCOPanopticEvaluator (panoptic quality) imports panopticapi, which is not on PyPI;
# panopticapi-lite packages the same code. --no-deps: it pins numpy<2, which this venv outgrew
# (its evaluation code runs on numpy 2).
pipq install -q --no-deps panopticapi-lite==0.2.0

pipq install -q --no-deps --no-build-isolation -e .
$VPY -c 'import detectron2, slim_det; print("[setup] detectron2", detectron2.__version__, "ok")'
echo "$SETUP_VERSION" > "$STAMP"
