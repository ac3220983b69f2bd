# Creates (once) the virtual environment the other scripts use, and installs lfp_jax into it.
# VENV: where (default .venv); PYTHON: the interpreter to build it from (default python3); EXTRAS: the
# optional dependencies to install (default test,experiments; scripts/docs.sh adds docs). An existing
# environment is brought up to date when pyproject.toml changed or an extra it lacks is asked for.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
EXTRAS="${EXTRAS:-test,experiments}"
marker="$VENV/.lfp_jax_installed"
missing=""
if [ -f "$marker" ]; then
  for extra in ${EXTRAS//,/ }; do
    grep -qx "$extra" "$marker" || missing="$missing $extra"
  done
fi
if [ ! -x "$VENV/bin/python" ] || [ ! -f "$marker" ] || [ -n "$missing" ] \
    || [ "$ROOT/pyproject.toml" -nt "$marker" ]; then
  [ -f "$marker" ] && EXTRAS="$(sort -u <(tr ',' '\n' <<<"$EXTRAS") "$marker" | grep . | paste -sd, -)"
  echo "setting up $VENV with $($PYTHON --version) (extras: $EXTRAS) ..." >&2
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT[$EXTRAS]" >&2
  tr ',' '\n' <<<"$EXTRAS" > "$marker"
fi
cd "$ROOT"
