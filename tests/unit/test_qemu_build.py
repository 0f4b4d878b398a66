"""The patched-QEMU build's pure parts (series, key, apt and ninja parsing, configure arguments),
its cache and clean-up rules, and how a binary is chosen for a spec (with fake QEMU scripts)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from hvtools.errors import DependencyError, UsageError
from hvtools.qemu import binary, build
from hvtools.qemu.build import (
    BASE,
    Patch,
    blob_placeholders,
    configure_args,
    first_error,
    parse_ninja_progress,
    parse_showsrc,
    read_series,
    series_key,
)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private $HVTOOLS_HOME, no HVTOOLS_QEMU."""
    monkeypatch.setenv("HVTOOLS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HVTOOLS_QEMU", raising=False)
    return tmp_path / "home"


# -- the series -----------------------------------------------------------------------------------
def test_series_in_name_order_readme_ignored(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("not a patch")
    (tmp_path / "0002-b.patch").write_bytes(b"second")
    (tmp_path / "0001-a.patch").write_bytes(b"first")
    (tmp_path / "notes.txt").write_text("ignored")
    series = read_series(tmp_path)
    assert [(p.name, p.data) for p in series] == [("0001-a.patch", b"first"),
                                                  ("0002-b.patch", b"second")]


def test_empty_series(tmp_path: Path) -> None:
    assert read_series(tmp_path) == ()


@pytest.mark.parametrize(("files", "message"), [
    (["fix.patch"], "not a NNNN-name.patch"),
    (["0001-a.patch", "0001-b.patch"], "share the number 0001"),
])
def test_broken_series_is_refused(tmp_path: Path, files: list[str], message: str) -> None:
    for f in files:
        (tmp_path / f).write_bytes(b"x")
    with pytest.raises(UsageError, match=message):
        read_series(tmp_path)


def test_missing_series_dir(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        read_series(tmp_path / "nope")


def test_the_checkout_series_reads() -> None:
    """The real qemu-patches/ (empty, partial or whole) is a valid series."""
    series = read_series(build.default_patches_dir())
    assert all(p.name[:4].isdigit() for p in series)


# -- the key --------------------------------------------------------------------------------------
def test_key_definition() -> None:
    """The key, spelled out: changing it orphans every install, so it is pinned here."""
    a, b = Patch("0001-a.patch", b"AAA"), Patch("0002-bb.patch", b"")
    h = hashlib.sha256(b"hvtools-qemu-build-v1\0" + BASE.sha256.encode() + b"\0")
    h.update(b"12:0001-a.patch3:AAA")
    h.update(b"13:0002-bb.patch0:")
    assert series_key(BASE.sha256, (a, b)) == h.hexdigest()[:16]
    assert series_key(BASE.sha256, ()) == "dd7064c8eb31370b"


def test_key_depends_on_base_names_bytes_and_order() -> None:
    a, b = Patch("0001-a.patch", b"AAA"), Patch("0002-b.patch", b"BBB")
    key = series_key(BASE.sha256, (a, b))
    assert len(key) == 16 and int(key, 16) >= 0
    assert series_key(BASE.sha256, (a, b)) == key
    others = [
        series_key("0" * 64, (a, b)),
        series_key(BASE.sha256, (b, a)),
        series_key(BASE.sha256, (a,)),
        series_key(BASE.sha256, (a, Patch("0002-b.patch", b"BBb"))),
        series_key(BASE.sha256, (a, Patch("0002-c.patch", b"BBB"))),
        series_key(BASE.sha256, ()),
    ]
    assert len({key, *others}) == 1 + len(others)


def test_key_has_no_concatenation_collisions() -> None:
    one = (Patch("0001-a.patch", b"x" + b"0002-b.patch" + b"y"),)
    two = (Patch("0001-a.patch", b"x"), Patch("0002-b.patch", b"y"))
    assert series_key(BASE.sha256, one) != series_key(BASE.sha256, two)


# -- apt, ninja, meson, configure -----------------------------------------------------------------
SHOWSRC = f"""Package: qemu
Version: 1:7.2+dfsg-7+deb12u7
Checksums-Sha256:
 {"1" * 64} 123 qemu_7.2+dfsg.orig.tar.xz

Package: qemu
Binary: qemu-system, qemu-utils
Version: {BASE.version}
Checksums-Sha256:
 {"a" * 64} 11887 qemu_10.0.2+ds-2+deb13u1~bpo12+1.dsc
 {BASE.sha256} 39449628 {BASE.tarball}
Homepage: http://www.qemu.org/
"""


def test_showsrc_picks_the_pinned_version() -> None:
    sums = parse_showsrc(SHOWSRC, BASE.version)
    assert sums[BASE.tarball] == BASE.sha256
    assert sums["qemu_10.0.2+ds-2+deb13u1~bpo12+1.dsc"] == "a" * 64
    assert parse_showsrc(SHOWSRC, "1:7.2+dfsg-7+deb12u7") == {
        "qemu_7.2+dfsg.orig.tar.xz": "1" * 64}
    assert parse_showsrc(SHOWSRC, "1:9.9") == {}


def test_ninja_progress_lines() -> None:
    assert parse_ninja_progress("[12/1623] Compiling C object x.o\n") == (12, 1623)
    assert parse_ninja_progress("FAILED: libcommon.a.p/x.o") is None
    assert parse_ninja_progress("../hw/x.c:1:2: error: [1/2]") is None


def test_blob_placeholders_from_pc_bios_meson_build() -> None:
    text = """if unpack_edk2_blobs
  fds = [
    'edk2-aarch64-code.fd',
    'edk2-x86_64-code.fd',
  ]
  foreach f : fds
"""
    assert blob_placeholders(text) == ["edk2-aarch64-code.fd.bz2", "edk2-x86_64-code.fd.bz2"]
    assert blob_placeholders("nothing here") == []


def test_configure_args_are_the_lean_x86_build() -> None:
    args = configure_args(Path("/p"), Path("/v/bin/python3"))
    assert args[0] == "--target-list=x86_64-softmmu"
    assert "--without-default-features" in args and "--disable-install-blobs" in args
    for feature in ("tcg", "kvm", "slirp", "vhost-user"):
        assert f"--enable-{feature}" in args
    assert "--prefix=/p" in args and "--python=/v/bin/python3" in args
    # The +ds tarball has no firmware: Debian's directories, as the stock binary's -L help.
    assert "--firmwarepath=/usr/share/qemu:/usr/share/seabios:/usr/lib/ipxe/qemu" in args
    assert len(set(args)) == len(args)


def test_first_error_prefers_the_compiler_over_ninja() -> None:
    lines = ["[5/9] Compiling C object a.o", "FAILED: libcommon.a.p/hw_misc_hvt.c.o",
             "cc -o ...", "../hw/misc/hvt.c:10:3: error: 'x' undeclared", "ninja: stopped"]
    assert first_error(lines) == "../hw/misc/hvt.c:10:3: error: 'x' undeclared"
    assert first_error(["one", "two", ""]) == "two"
    assert first_error([]) == "no output"


# -- installs, cache, clean-up --------------------------------------------------------------------
def _fake_qemu(path: Path, *, hvt_pci: bool, x_nested: bool = False) -> Path:
    """A shell script that answers the probes like qemu-system-x86_64 10.0.2 would."""
    path.parent.mkdir(parents=True, exist_ok=True)
    devices = 'echo \'name "edu", bus PCI\'' + (
        '; echo \'name "hvt-pci", bus PCI, desc "PASID DMA engine"\'' if hvt_pci else "")
    iommu = "  x-flts=<bool>" + ("\n  x-nested=<bool>" if x_nested else "")
    path.write_text(f"""#!/bin/sh
case "$*" in
  --version) echo "QEMU emulator version 10.0.2"; echo "Copyright";;
  "-device help") {devices};;
  "-device intel-iommu,help") printf 'intel-iommu options:\\n{iommu}\\n';;
  *) exit 1;;
esac
""")
    path.chmod(0o755)
    return path


def _install(home: Path, key: str, *, built_at: float, hvt_pci: bool,
             complete: bool = True) -> Path:
    root = home / "qemu" / key
    _fake_qemu(root / "bin" / "qemu-system-x86_64", hvt_pci=hvt_pci)
    (root / "manifest.json").write_text(json.dumps({"built_at": built_at, "patches": []}))
    if complete:
        (root / ".complete").write_text(key)
    return root


def _series(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> str:
    """A one-patch series in ``tmp_path`` as $HVTOOLS_QEMU_PATCHES; returns its key."""
    d = tmp_path / "series"
    d.mkdir(exist_ok=True)
    (d / "0001-x.patch").write_text(text)
    monkeypatch.setenv("HVTOOLS_QEMU_PATCHES", str(d))
    return build.current_key()


def test_spec_with_hvt_pci_runs_on_the_current_series_build(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = _series(tmp_path, monkeypatch, "From x\n")
    _install(home, key, built_at=100, hvt_pci=True)
    _install(home, "2" * 16, built_at=200, hvt_pci=True)  # newer, another (older) series
    _install(home, "4" * 16, built_at=400, hvt_pci=True, complete=False)  # interrupted
    assert [i.key for i in binary.patched_installs()] == ["2" * 16, key]
    chosen = binary.find_qemu(devices=["hvt-pci"])
    assert chosen.path == home / "qemu" / key / "bin" / "qemu-system-x86_64"
    assert chosen.version == (10, 0, 2)


def test_a_stale_build_of_another_series_is_not_used(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = _series(tmp_path, monkeypatch, "From y\n")
    _install(home, "2" * 16, built_at=200, hvt_pci=True)
    with pytest.raises(DependencyError, match=rf"series \(key {key}\) is not built \(1 "
                       r"build\(s\) of other series exist\): run `hvtools qemu build`"):
        binary.find_qemu(devices=["hvt-pci"])
    _install(home, key, built_at=300, hvt_pci=False)  # this series, without the device
    with pytest.raises(DependencyError, match="lacks hvt-pci"):
        binary.find_qemu(devices=["hvt-pci"])


def test_without_a_series_the_newest_build_that_has_it_runs(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HVTOOLS_QEMU_PATCHES", str(tmp_path / "no-such-dir"))
    with pytest.raises(DependencyError, match=r"needs the patched QEMU \(hvt-pci\): run "
                       "`hvtools qemu build`"):
        binary.find_qemu(devices=["hvt-pci"])
    _install(home, "1" * 16, built_at=100, hvt_pci=True)
    _install(home, "2" * 16, built_at=200, hvt_pci=True)
    _install(home, "3" * 16, built_at=300, hvt_pci=False)  # newest, but an empty series
    chosen = binary.find_qemu(devices=["hvt-pci"])
    assert chosen.path == home / "qemu" / ("2" * 16) / "bin" / "qemu-system-x86_64"


def test_explicit_qemu_must_have_the_device(home: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    stock = _fake_qemu(tmp_path / "stock" / "qemu", hvt_pci=False)
    monkeypatch.setenv("HVTOOLS_QEMU", str(stock))
    _install(home, "6" * 16, built_at=1, hvt_pci=True)
    with pytest.raises(DependencyError, match="has no hvt-pci device"):
        binary.find_qemu(devices=["hvt-pci"])
    assert binary.find_qemu().path == stock  # a spec without it runs on HVTOOLS_QEMU


def test_capabilities_of_a_binary(tmp_path: Path) -> None:
    fake = _fake_qemu(tmp_path / "q", hvt_pci=True, x_nested=True)
    caps = binary.capabilities(fake)
    assert (caps.version, caps.hvt_pci, caps.x_nested, caps.qtest) == ("10.0.2", True, True,
                                                                       False)


def test_built_series_is_returned_from_the_cache(home: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    patches = tmp_path / "series"
    patches.mkdir()
    (patches / "0001-a.patch").write_bytes(b"a")
    key = build.current_key(patches)
    _install(home, key, built_at=1, hvt_pci=True)

    def no_build(*_a: object, **_k: object) -> None:
        raise AssertionError("a cached series must not start a build")

    monkeypatch.setattr(build, "check_build_dependencies", no_build)
    res = build.build(patches_dir=patches)
    assert res.cached and res.install.key == key and res.steps == {}
    assert build.current_install(patches) == res.install


def test_failed_build_leaves_no_install_and_keeps_the_log(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    patches = tmp_path / "series"
    patches.mkdir()
    key = build.current_key(patches)
    monkeypatch.setattr(build, "check_build_dependencies", lambda: None)

    def broken_fetch(self: build._Builder) -> Path:
        (self.work / "src").mkdir()  # half-done work that must go
        self.note("fetching")
        raise build.QemuBuildError(build.Step.FETCH, "mirror says 404", self.log_path)

    monkeypatch.setattr(build._Builder, "fetch", broken_fetch)
    steps: list[str] = []
    with pytest.raises(build.QemuBuildError, match=r"qemu build: fetch: mirror says 404 \(log: "):
        build.build(patches_dir=patches, progress=lambda s, *_: steps.append(str(s)))
    root = home / "qemu"
    assert sorted(p.name for p in root.iterdir()) == [".lock", "logs"]
    log = (root / "logs" / f"{key}.log").read_text()
    assert "fetching" in log and "FAILED: qemu build: fetch: mirror says 404" in log
    assert build.current_install(patches) is None


def test_incomplete_install_is_not_an_install(home: Path) -> None:
    root = _install(home, "7" * 16, built_at=1, hvt_pci=True, complete=False)
    assert binary.read_install(root) is None
    (root / ".complete").write_text("x")
    assert binary.read_install(root) is not None
    os.chmod(root / "bin" / "qemu-system-x86_64", 0o644)  # not runnable: not complete
    assert binary.read_install(root) is None


def test_jobs_must_be_positive(home: Path) -> None:
    with pytest.raises(UsageError, match="--jobs 0"):
        build.build(jobs=0)
