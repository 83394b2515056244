#!/usr/bin/env bash
# Runs real rqlite client libraries from PyPI (pinned in requirements.txt) against a real
# Apiary node: pyrqlite, sqlalchemy-rqlite with SQLAlchemy 2.0, rqdb (sync and async).
#
#   Tests/clients/run.sh [unittest arguments, e.g. -k blob]
#
# Makes (once per requirements.txt) a virtual environment in .build/clients-venv, then
# harness.py starts a node (apiary certs, apiary node --mode single on loopback), creates a
# tenant and users with apiary ctl, and runs the test_*.py files here with unittest.
# Environment: APIARY (the binary; default .build/debug/apiary), PYTHON (default python3),
# APIARY_CLIENTS_VENV (where the environment lives).
# Exit status: 0 passed; 77 skipped because PyPI cannot be reached (nothing was tested);
# anything else failed. ApiaryIntegrationTests/RqliteClientsTests runs this in `swift test`.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
apiary="${APIARY:-$root/.build/debug/apiary}"
python="${PYTHON:-python3}"
venv="${APIARY_CLIENTS_VENV:-$root/.build/clients-venv}"

[[ -x "$apiary" ]] || { echo "no apiary binary at $apiary: run swift build first" >&2; exit 1; }
command -v "$python" >/dev/null || { echo "$python not found: install python3 and python3-venv (scripts/install-system-packages)" >&2; exit 1; }

mkdir -p "$(dirname "$venv")"
# One run at a time makes or updates the environment.
exec 9>"$venv.lock"
flock 9
stamp="$venv/.requirements-$(sha256sum "$here/requirements.txt" | cut -c1-16)"
if [[ ! -e "$stamp" ]]; then
    rm -rf "$venv"
    "$python" -m venv "$venv" || { echo "cannot make a virtual environment with $python (Debian: apt-get install python3-venv)" >&2; exit 1; }
    if ! "$venv/bin/python" -m pip install --disable-pip-version-check --quiet --no-input -r "$here/requirements.txt"; then
        # Skip only when the package index cannot be reached at all; any other failure fails.
        index=${PIP_INDEX_URL:-$("$venv/bin/python" -m pip config get global.index-url 2>/dev/null || true)}
        index=${index:-https://pypi.org/simple}
        rm -rf "$venv"
        if ! reason=$("$python" - "$index" <<'PY'
import sys, urllib.error, urllib.request
url = sys.argv[1].rstrip("/") + "/pyrqlite/"
try:
    urllib.request.urlopen(url, timeout=20).read(1)
except urllib.error.HTTPError:
    pass  # the index answered: reachable
except Exception as error:
    print(f"{url}: {error}")
    sys.exit(1)
PY
        ); then
            echo "SKIP: cannot reach the Python package index to install the rqlite clients: $reason"
            exit 77
        fi
        echo "pip install -r $here/requirements.txt failed, though the package index answers" >&2
        exit 1
    fi
    touch "$stamp"
fi
flock -u 9

# No __pycache__ in the source tree.
export PYTHONDONTWRITEBYTECODE=1
exec "$venv/bin/python" "$here/harness.py" --apiary "$apiary" "$@"
