#!/usr/bin/env bash
# The test suite (sets itself up). Extra arguments go to pytest.
source "$(dirname "$0")/_env.sh"
"$VENV/bin/python" -c "import jax, flax, optax, sys; print(f'python {sys.version.split()[0]}, jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}')"
exec "$VENV/bin/python" -m pytest "$@"
