# Creates (once) the virtual environment the other scripts use, and installs lfp_jax into it.
# VENV: where (default .venv); PYTHON: the interpreter to build it from (default python3).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
EXTRAS="${EXTRAS:-test,experiments}"
if [ ! -x "$VENV/bin/python" ] || [ ! -f "$VENV/.lfp_jax_installed" ] \
    || [ "$ROOT/pyproject.toml" -nt "$VENV/.lfp_jax_installed" ]; then
  echo "setting up $VENV with $($PYTHON --version) ..." >&2
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT[$EXTRAS]" >&2
  touch "$VENV/.lfp_jax_installed"
fi
cd "$ROOT"
