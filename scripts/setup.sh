#!/usr/bin/env bash
# Set up vitlab on a fresh Debian/Ubuntu machine: Fashion-MNIST from Debian (when apt is there),
# a virtual environment in .venv with vitlab and its test tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
  echo "== installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
  { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist; } >/dev/null 2>&1 \
    || echo "   (apt could not install it; vitlab will download Fashion-MNIST or use --data-dir)"
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv with $($PY --version)"
  if ! "$PY" -m venv .venv 2>/dev/null; then
    rm -rf .venv
    SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
    echo "== installing python3-venv (Debian splits venv out of python3)"
    $SUDO apt-get install -y -qq python3-venv python3-pip >/dev/null
    "$PY" -m venv .venv
  fi
fi
echo "== installing vitlab and its dependencies into .venv (PyTorch is large the first time)"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test,export]"
echo "== ready: .venv/bin/vitlab --help"
