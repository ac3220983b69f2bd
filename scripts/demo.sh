#!/usr/bin/env bash
# The main job: train one MLP with LFP and with gradient descent and compare (sets itself up).
source "$(dirname "$0")/_env.sh"
exec "$VENV/bin/python" -m experiments.demo "$@"
