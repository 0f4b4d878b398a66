#!/usr/bin/env bash
# The main job on the embedded default (qemu driver, local lab of two hosts):
#   lab up; a guest on h1 with a scalable-mode vIOMMU and a workload that keeps writing memory
#   and counting; live migration to h2; h2 fails; recovery onto h1 by one-sided READs of h2's
#   memory; the counter kept counting with no gap or rollback; lab down, nothing left.
set -euo pipefail
hv=${1:-.venv/bin/hvtools}
name=${HVTOOLS_DEMO_VM:-demo}

cleanup() {
  "$hv" vm kill "$name" >/dev/null 2>&1 || true
  "$hv" vm rm "$name" >/dev/null 2>&1 || true
  # A migration's destination record (NAME.mXXXXX) that an interrupted run left.
  for rec in $("$hv" vm list --json 2>/dev/null | grep -o "\"$name\.m[0-9a-f]*\"" | tr -d '"'); do
    "$hv" vm kill "$rec" >/dev/null 2>&1 || true
    "$hv" vm rm "$rec" >/dev/null 2>&1 || true
  done
  "$hv" lab down >/dev/null 2>&1 || true
}
trap cleanup EXIT
cleanup

# The guest workload: count, append each value to a log in guest RAM (tmpfs), dirty 64 KiB of a
# 32 MiB buffer per step, and print the counter on the serial console every 500 steps.
workload='i=0; while :; do i=$((i+1)); echo $i >> /tmp/counter.log;
 dd if=/dev/urandom of=/dev/shm/buf bs=64k count=1 seek=$((i % 512)) conv=notrunc 2>/dev/null;
 [ $((i % 500)) = 0 ] && echo "counter $i" > /dev/ttyS0; done'
# Reads the log back: the last value, and whether it is exactly 1, 2, 3, ... (no gap, no repeat).
check='awk "\$1 != NR { print \"BROKEN at line \" NR \": \" \$1; bad=1; exit } END { if (!bad) print NR }" /tmp/counter.log'

counter() { "$hv" vm exec "$name" -- sh -c "$check"; }

echo "== hvtools lab up"
"$hv" lab up
echo
echo "== hvtools vm start $name --host h1 --iommu scalable,pasid,flts --memory 1G"
"$hv" vm start "$name" --host h1 --iommu scalable,pasid,flts --memory 1G --vcpus 1 --timings
"$hv" vm exec "$name" -- sh -c "dd if=/dev/urandom of=/dev/shm/data bs=1M count=192 2>/dev/null"
"$hv" vm exec "$name" -- sh -c "($workload) >/dev/null 2>&1 &"
sleep 2
c0=$(counter); echo "counter on h1: $c0"
echo
echo "== hvtools migrate $name --to h2"
"$hv" migrate "$name" --to h2
c1=$(counter); echo "counter on h2: $c1"
echo
echo "== hvtools host fail h2"
"$hv" host fail h2
echo
echo "== hvtools recover $name --to h1"
"$hv" recover "$name" --to h1
sleep 1
c2=$(counter); echo "counter on h1 after recovery: $c2"
c3=$(counter); echo "counter a moment later: $c3"
"$hv" vm list
for c in "$c0" "$c1" "$c2" "$c3"; do
  case $c in (*BROKEN*) echo "demo: the counter log is broken: $c" >&2; exit 1;; esac
done
if ! [ "$c0" -lt "$c1" ] || ! [ "$c1" -lt "$c2" ] || ! [ "$c2" -lt "$c3" ]; then
  echo "demo: the counter did not keep counting ($c0 $c1 $c2 $c3)" >&2
  exit 1
fi
echo "counter: $c0 -> $c1 -> $c2 -> $c3, every value logged once, in order"
echo
echo "== hvtools host revive h2; hvtools lab down"
"$hv" host revive h2
"$hv" vm kill "$name" >/dev/null
"$hv" vm rm "$name" >/dev/null
"$hv" lab down
trap - EXIT
# Anything of this lab's: its namespaces (hv-lab-*), its agents, the VM's QEMU.
left=$(ip netns list | grep -c '^hv-lab-' || true)
if pgrep -f "hvtools.lab.agent ${HVTOOLS_HOME:-/var/lib/hvtools}/lab/lab/" >/dev/null \
    || pgrep -f "qemu-system-x86_64 -name $name[.,]" >/dev/null || [ "$left" != 0 ]; then
  echo "demo: something was left behind" >&2
  exit 1
fi
echo "demo: done, nothing left behind"
