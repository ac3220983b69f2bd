#!/usr/bin/env bash
# The test suite (sets itself up). Extra arguments go to pytest.
# Test files run in parallel over the CPU cores (pytest-xdist, at most 4 workers: each holds its own
# compiled programs); pass -n 0 to run in one process, --slow to add the long integration tests (CI does).
source "$(dirname "$0")/_env.sh"
"$VENV/bin/python" -c "import jax, flax, optax, sys; print(f'python {sys.version.split()[0]}, jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}')"
parallel=()
case " $* " in
  *" -n "*|*" -n="*|*" --numprocesses"*|*" --version "*) ;;
  *) workers=$(( $(nproc) < 4 ? $(nproc) : 4 ))
     parallel=(-n "$workers" --dist loadfile) ;;
esac
exec "$VENV/bin/python" -m pytest "${parallel[@]}" "$@"
