#!/usr/bin/env bash
# Run the test tiers. Integration tests boot real QEMU (TCG) and a real libvirtd that the
# tests start themselves. HVTOOLS_SLOW=1 adds the slow tier.
set -euo pipefail
venv=${1:-.venv}
# The patched QEMU for the current series (built when missing, else instant); tests find it
# with hvtools.qemu.build.current_install(), scripts with $HVTOOLS_QEMU_PATCHED.
"$venv/bin/hvtools" qemu build
HVTOOLS_QEMU_PATCHED=$("$venv/bin/python" -c \
  'from hvtools.qemu.build import current_install as c; print(c().binary)')
export HVTOOLS_QEMU_PATCHED
marker="not slow"
[ "${HVTOOLS_SLOW:-0}" = 1 ] && marker=""
"$venv/bin/python" -m pytest -q -ra ${marker:+-m "$marker"} tests
