#!/usr/bin/env bash
# Run the test tiers. Integration tests boot real QEMU (TCG) and a real libvirtd that the
# tests start themselves. HVTOOLS_SLOW=1 adds the slow tier.
set -euo pipefail
venv=${1:-.venv}
marker="not slow"
[ "${HVTOOLS_SLOW:-0}" = 1 ] && marker=""
"$venv/bin/python" -m pytest -q -ra ${marker:+-m "$marker"} tests
