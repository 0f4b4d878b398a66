#!/usr/bin/env bash
# The main job on the embedded default (qemu driver): boot a guest with the full scalable-mode
# vIOMMU, run a command in it, print its decoded VT-d capabilities and boot time, stop it.
set -euo pipefail
hv=${1:-.venv/bin/hvtools}
name=${HVTOOLS_DEMO_VM:-demo}

cleanup() { "$hv" vm kill "$name" >/dev/null 2>&1 || true; "$hv" vm rm "$name" >/dev/null 2>&1 || true; }
trap cleanup EXIT
cleanup

echo "== hvtools vm start $name --iommu scalable,pasid,flts --timings"
"$hv" vm start "$name" --iommu scalable,pasid,flts --memory 1G --vcpus 2 --timings
echo
echo "== hvtools vm exec $name -- uname -a; cat /proc/cmdline"
"$hv" vm exec "$name" -- uname -a
"$hv" vm exec "$name" -- cat /proc/cmdline
echo
echo "== hvtools iommu caps $name"
"$hv" iommu caps "$name"
echo
echo "== hvtools vm stop $name"
"$hv" vm stop "$name"
"$hv" vm rm "$name"
trap - EXIT
if pgrep -f "qemu-system-x86_64 -name $name," >/dev/null; then
  echo "demo: a QEMU of $name is still running" >&2
  exit 1
fi
echo "demo: done, no QEMU left"
