#!/usr/bin/env bash
# Create the project venv and install hvtools (editable) with its dev tools. Idempotent.
set -euo pipefail
venv=${1:-.venv}
py=${PYTHON:-python3}
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -e ".[dev]"

# Debian's python3-pyverbs (rdma-core) lives in /usr/lib/python3/dist-packages, which a venv
# does not see. Expose that one package: a directory holding only a `pyverbs` symlink, put on
# sys.path by a .pth file (not the whole dist-packages, whose other modules would shadow pip's).
if [ -d /usr/lib/python3/dist-packages/pyverbs ]; then
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  mkdir -p "$venv/debian-pyverbs"
  ln -sfn /usr/lib/python3/dist-packages/pyverbs "$venv/debian-pyverbs/pyverbs"
  (cd "$venv" && echo "$(pwd)/debian-pyverbs") > "$site/hvtools-debian-pyverbs.pth"
  "$venv/bin/python" -c 'import pyverbs' \
    || echo "setup-venv: warning: pyverbs does not import in $venv" >&2
fi
