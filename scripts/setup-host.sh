#!/usr/bin/env bash
# Install what hvtools needs on a Debian 12 host. Idempotent: each step checks before it acts.
# QEMU 10.0.2 and seabios 1.16.3 come from bookworm-backports (bookworm's seabios 1.16.2 stalls
# every boot ~30 s in the BIOS).
set -euo pipefail

QEMU_WANT="10.0.2"
# The source package `hvtools qemu build` takes its orig tarball from (hvtools/qemu/build.py).
QEMU_SRC_VERSION="1:10.0.2+ds-2+deb13u1~bpo12+1"
need_update=0

if [ "$(id -u)" != 0 ]; then
  echo "setup-host: must run as root (apt-get, libvirtd, namespaces)" >&2
  exit 1
fi

if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  echo "setup-host: adding bookworm-backports"
  cat > /etc/apt/sources.list.d/hvtools-backports.sources <<'SRC'
Types: deb deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  need_update=1
fi

PKGS=(python3 python3-venv python3-dev busybox-static cpio kmod xz-utils zstd gcc libc6-dev
      make pkg-config
      libvirt-daemon-system libvirt-dev iproute2 util-linux libfabric1 libfabric-bin
      libfabric-dev python3-pyverbs
      # `hvtools qemu build` (the patched QEMU, x86_64-softmmu with TCG, KVM, slirp, vhost;
      # meson and pycotap come from PyPI into its own venv)
      git bzip2 ninja-build flex bison libglib2.0-dev zlib1g-dev libslirp-dev libfdt-dev)
BPO_PKGS=(qemu-system-x86 qemu-utils qemu-system-common qemu-system-data seabios)

missing=()
for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
qemu_ver=$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null || true)
seabios_ver=$(dpkg-query -W -f='${Version}' seabios 2>/dev/null || true)
bpo_needed=0
case "$qemu_ver" in *"$QEMU_WANT"*) ;; *) bpo_needed=1 ;; esac
case "$seabios_ver" in 1.16.3*) ;; *) bpo_needed=1 ;; esac

if [ ${#missing[@]} -gt 0 ] || [ $bpo_needed = 1 ]; then
  if [ $need_update = 1 ] || [ ! -d /var/lib/apt/lists ] || \
     ! ls /var/lib/apt/lists/*bookworm-backports*Packages* >/dev/null 2>&1; then
    apt-get update -q
  fi
  export DEBIAN_FRONTEND=noninteractive
  if [ ${#missing[@]} -gt 0 ]; then
    echo "setup-host: installing ${missing[*]}"
    # libvirt-daemon-system's postinst tries to start services; without systemd that is harmless.
    apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
  if [ $bpo_needed = 1 ]; then
    echo "setup-host: installing QEMU $QEMU_WANT and seabios 1.16.3 from bookworm-backports"
    apt-get install -y -q --no-install-recommends -t bookworm-backports "${BPO_PKGS[@]}"
  fi
fi

# `hvtools qemu build` fetches QEMU's orig tarball with apt-get source: it needs the
# bookworm-backports Sources index (deb-src), which a plain `deb` backports entry lacks.
has_qemu_src() {  # not `apt-cache | grep -q`: grep's early exit would fail the pipe
  local src
  src=$(apt-cache showsrc qemu 2>/dev/null || true)
  grep -qxF "Version: $QEMU_SRC_VERSION" <<<"$src"
}
if ! has_qemu_src; then
  src_list=/etc/apt/sources.list.d/hvtools-backports-src.sources
  if [ ! -e "$src_list" ]; then
    echo "setup-host: adding deb-src for bookworm-backports (the QEMU source of qemu build)"
    cat > "$src_list" <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  fi
  apt-get update -q
  has_qemu_src || echo "setup-host: warning: apt has no source of qemu $QEMU_SRC_VERSION" >&2
fi

qemu-system-x86_64 --version | head -1
dpkg-query -W -f='seabios ${Version}\n' seabios

# Without udev, /dev/kvm stays root 0600; libvirt 9.0 then discards its QEMU capability cache
# on every call (~100 s per define). Give it what Debian's udev rule would: root:kvm 0660.
if [ -c /dev/kvm ] && getent group kvm >/dev/null; then
  chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
fi
