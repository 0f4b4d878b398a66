"""``hvtools qemu build``: the pinned QEMU source with our patch series, built and cached.

Base: the orig tarball of Debian's ``qemu 1:10.0.2+ds-2+deb13u1~bpo12+1`` (bookworm-backports),
fetched with ``apt-get source --download-only``. That command exits 100 here because the
``.dsc`` and ``.debian.tar.xz`` are gone from the mirror (404); the tarball alone is what we
need, so the failure is accepted if and only if the tarball arrived and its sha256 equals the
one apt's Sources index lists for that version (``apt-cache showsrc qemu``), which must also be
the one pinned here.

Series: ``qemu-patches/NNNN-*.patch`` (``git format-patch``), applied in name order with
``git am`` onto a commit of the unpacked tarball. Any series works, the empty one included.

Steps: fetch → verify → extract → apply → venv → configure → build → install. Everything happens
in ``$HVTOOLS_HOME/qemu/.build-<key>/`` and the install is renamed into
``$HVTOOLS_HOME/qemu/<key>/`` at the very end, ``.complete`` written last, so a failed or
interrupted build leaves no half install; the log stays in ``$HVTOOLS_HOME/qemu/logs/<key>.log``.
The key is :func:`series_key`: the base tarball's sha256 and each patch's name and bytes.

Feature set: x86_64-softmmu only, ``--without-default-features`` plus what hvtools drives (TCG,
KVM, slirp user networking, vhost-user/-kernel/-net, TCG plugins, system libfdt), every default
device (so a device the series adds with ``default y`` is built), no tools, docs or blobs. The
+ds tarball has no firmware: the binary searches Debian's directories (``--firmwarepath``,
``qemu-system-data``, ``seabios``, ``ipxe-qemu``), and the edk2 images that pc-bios/meson.build
insists on are empty placeholders that are never installed. Only the emulator is built and
installed (``ninja qemu-system-x86_64``), not the test programs.
"""

from __future__ import annotations

import bz2
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import IO, Any

from hvtools.errors import DependencyError, HvError, UsageError
from hvtools.qemu.binary import (
    COMPLETE_STAMP,
    MANIFEST,
    PatchedInstall,
    capabilities,
    qemu_root,
    read_install,
)


class QemuBuildError(HvError):
    """A step of ``hvtools qemu build`` failed. Carries the step and the log's path."""

    def __init__(self, step: str, message: str, log: Path | None = None) -> None:
        where = f" (log: {log})" if log else ""
        super().__init__(f"qemu build: {step}: {message}{where}")
        self.step = step
        self.log = log


@dataclass(frozen=True)
class BaseSource:
    """The pinned QEMU source: a Debian source package's orig tarball."""

    package: str
    version: str  # Debian version, for apt-get source PACKAGE=VERSION
    upstream: str  # QEMU's own version, what --version prints
    tarball: str
    sha256: str
    topdir: str  # the directory the tarball unpacks into


BASE = BaseSource(
    package="qemu", version="1:10.0.2+ds-2+deb13u1~bpo12+1", upstream="10.0.2",
    tarball="qemu_10.0.2+ds.orig.tar.xz",
    sha256="0901da33844a331bf8b3602b9c1fbd178e60b737c8e3ade678255bd090c9b9f1",
    topdir="qemu-10.0.2")

#: configure's mkvenv is offline and the +ds tarball has no python/wheels: meson (>= 1.5, what
#: QEMU 10.0 needs; bookworm has 1.0) and pycotap come from PyPI into a venv of our own.
BUILD_PYTHON_REQUIREMENTS = ("meson>=1.5,<1.9", "pycotap==1.3.1")

#: Debian's firmware directories (`qemu-system-x86_64 -L help` of the stock build).
FIRMWARE_PATH = ("/usr/share/qemu", "/usr/share/seabios", "/usr/lib/ipxe/qemu")

#: Features on top of --without-default-features, each for something hvtools drives.
FEATURES = (
    "--enable-tcg",  # every guest here (the host's KVM cannot run stock guests)
    "--enable-kvm",  # lab hosts with a working KVM
    "--enable-slirp",  # virtio-net with -netdev user
    "--enable-vhost-user",  # vhost-user-blk (hvtools.vhost)
    "--enable-vhost-kernel", "--enable-vhost-net",
    "--enable-plugins",  # TCG plugins (plugins/)
    "--enable-fdt=system",
)

#: Executables and pkg-config modules the build needs (scripts/setup-host.sh installs them).
BUILD_TOOLS = ("apt-get", "apt-cache", "tar", "xz", "git", "cc", "ninja", "flex", "bison",
               "pkg-config", "make")
BUILD_PKGCONFIG = ("glib-2.0", "zlib", "slirp")

TARGET = "qemu-system-x86_64"

#: Progress callback: (step, message, done, total); done/total are ninja's [n/N] in `build`.
Progress = Callable[["Step", str, int | None, int | None], None]


class Step(StrEnum):
    """The build's steps, in order."""

    FETCH = "fetch"
    VERIFY = "verify"
    EXTRACT = "extract"
    APPLY = "apply"
    VENV = "venv"
    CONFIGURE = "configure"
    BUILD = "build"
    INSTALL = "install"


# -- the series ---------------------------------------------------------------------------------
_PATCH_RE = re.compile(r"^(\d{4})-[A-Za-z0-9._+-]+\.patch$")


@dataclass(frozen=True)
class Patch:
    """One patch of the series: its file name and bytes."""

    name: str
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def default_patches_dir() -> Path:
    """``$HVTOOLS_QEMU_PATCHES``, else ``qemu-patches/`` of the checkout hvtools runs from."""
    explicit = os.environ.get("HVTOOLS_QEMU_PATCHES")
    if explicit:
        return Path(explicit)
    return Path(__file__).resolve().parents[2] / "qemu-patches"


def read_series(directory: Path) -> tuple[Patch, ...]:
    """The ``NNNN-*.patch`` files of ``directory`` in name order (README and others ignored).

    A ``.patch`` file without the ``NNNN-`` prefix, or two patches with one number, is a
    :class:`UsageError`: ``git format-patch`` never makes either, so the series is broken.
    """
    if not directory.is_dir():
        raise UsageError(f"patch series directory {directory} does not exist "
                         "(--patches DIR or HVTOOLS_QEMU_PATCHES)")
    patches: list[Patch] = []
    seen: dict[str, str] = {}
    for path in sorted(directory.iterdir()):
        if not path.name.endswith(".patch"):
            continue
        m = _PATCH_RE.match(path.name)
        if not m or not path.is_file():
            raise UsageError(f"{path}: not a NNNN-name.patch file of the series")
        if m.group(1) in seen:
            raise UsageError(f"{directory}: patches {seen[m.group(1)]} and {path.name} "
                             f"share the number {m.group(1)}")
        seen[m.group(1)] = path.name
        patches.append(Patch(path.name, path.read_bytes()))
    return tuple(patches)


def series_key(base_sha256: str, patches: Sequence[Patch]) -> str:
    """The install's key: sha256 over the base tarball's sha256 and, in order, each patch's name
    and bytes (each field length-prefixed, so no two series collide by concatenation);
    the first 16 hex digits."""
    h = hashlib.sha256(b"hvtools-qemu-build-v1\0" + base_sha256.encode() + b"\0")
    for p in patches:
        name = p.name.encode()
        h.update(b"%d:%s%d:" % (len(name), name, len(p.data)))
        h.update(p.data)
    return h.hexdigest()[:16]


def current_key(patches_dir: Path | None = None) -> str:
    """The key of the series in ``patches_dir`` (default: this checkout's) on the pinned base."""
    return series_key(BASE.sha256, read_series(patches_dir or default_patches_dir()))


def current_install(patches_dir: Path | None = None) -> PatchedInstall | None:
    """The complete install of the current series, or None if it is not built (tests use it:
    ``make test`` builds it first)."""
    return read_install(qemu_root() / current_key(patches_dir))


# -- pure helpers ---------------------------------------------------------------------------------
def parse_showsrc(text: str, version: str) -> dict[str, str]:
    """``{file name: sha256}`` of the ``apt-cache showsrc`` paragraph for ``version``
    (its ``Checksums-Sha256`` field); empty if no paragraph has that version."""
    for para in re.split(r"\n\s*\n", text):
        fields: dict[str, list[str]] = {}
        current: list[str] | None = None
        for line in para.splitlines():
            if line[:1] in (" ", "\t") and current is not None:
                current.append(line.strip())
            elif ":" in line:
                key, _, value = line.partition(":")
                current = fields.setdefault(key.strip(), [])
                if value.strip():
                    current.append(value.strip())
        if fields.get("Version") != [version]:
            continue
        sums: dict[str, str] = {}
        for entry in fields.get("Checksums-Sha256", []):
            parts = entry.split()
            if len(parts) == 3:
                sums[parts[2]] = parts[0].lower()
        return sums
    return {}


_NINJA_RE = re.compile(r"^\[(\d+)/(\d+)\]")


def parse_ninja_progress(line: str) -> tuple[int, int] | None:
    """ninja's ``[n/N] description`` status line as ``(n, N)``, else None."""
    m = _NINJA_RE.match(line)
    return (int(m.group(1)), int(m.group(2))) if m else None


def blob_placeholders(meson_build: str) -> list[str]:
    """The ``<name>.bz2`` files pc-bios/meson.build decompresses (its ``fds = [...]`` list):
    the +ds tarball strips them, so empty bzip2 files stand in."""
    m = re.search(r"\bfds\s*=\s*\[(.*?)\]", meson_build, re.DOTALL)
    if not m:
        return []
    return [f"{name}.bz2" for name in re.findall(r"'([^']+)'", m.group(1))]


def configure_args(prefix: Path, python: Path) -> list[str]:
    """The ``configure`` arguments (see the module docstring for the choices)."""
    return ["--target-list=x86_64-softmmu", f"--prefix={prefix}",
            "--without-default-features", *FEATURES,
            "--disable-install-blobs", "--disable-docs", "--disable-werror",
            "--disable-debug-info",
            f"--firmwarepath={':'.join(FIRMWARE_PATH)}", f"--python={python}"]


def first_error(lines: Sequence[str]) -> str:
    """The line of a failed command's output that says why: the first compiler/meson/git
    ``error``, else the last non-empty line."""
    for ln in lines:
        if re.search(r"\berror\b|^ERROR|^fatal:|^FAILED:|Patch failed", ln):
            if ln.startswith("FAILED:"):
                continue  # ninja's FAILED names the object; the compiler line after says why
            return ln.strip()
    rest = [ln.strip() for ln in lines if ln.strip()]
    return rest[-1] if rest else "no output"


# -- the build --------------------------------------------------------------------------------
@dataclass(frozen=True)
class BuildResult:
    """What ``build`` did: the install, whether it was already there, seconds per step."""

    install: PatchedInstall
    cached: bool
    seconds: float
    steps: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return {"cached": self.cached, "seconds": round(self.seconds, 1),
                "steps": {k: round(v, 1) for k, v in self.steps.items()},
                **self.install.to_json()}


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_build_dependencies() -> None:
    """Every tool and library the build needs, or a :class:`DependencyError` naming the
    missing ones."""
    missing = [t for t in BUILD_TOOLS if shutil.which(t) is None]
    if shutil.which("pkg-config"):
        missing += [f"{m}.pc" for m in BUILD_PKGCONFIG
                    if subprocess.run(["pkg-config", "--exists", m]).returncode != 0]
    if missing:
        raise DependencyError(f"qemu build needs {', '.join(missing)}: run "
                              "scripts/setup-host.sh (make host)")


class _Builder:
    """One build of one series; :func:`build` drives it."""

    def __init__(self, patches: tuple[Patch, ...], key: str, jobs: int,
                 progress: Progress) -> None:
        self.patches = patches
        self.key = key
        self.jobs = jobs
        self.progress = progress
        self.root = qemu_root()
        self.work = self.root / f".build-{key}"
        self.log_path = self.root / "logs" / f"{key}.log"
        self.venv = self.root / "build-venv"
        self.steps: dict[str, float] = {}
        self._log: IO[str] | None = None

    # -- plumbing ---------------------------------------------------------------------------
    @property
    def log(self) -> IO[str]:
        assert self._log is not None
        return self._log

    def note(self, text: str) -> None:
        self.log.write(f"### {time.strftime('%H:%M:%S')} {text}\n")
        self.log.flush()

    def env(self) -> dict[str, str]:
        return {**os.environ, "LC_ALL": "C",
                "PATH": f"{self.venv / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}"}

    def run(self, step: Step, argv: Sequence[str], *, cwd: Path,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run one command, its output appended to the log; failure → QemuBuildError."""
        self.note(f"$ {' '.join(argv)}   (in {cwd})")
        res = subprocess.run(list(argv), cwd=cwd, env=self.env(), stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             errors="replace")
        self.log.write(res.stdout)
        self.log.flush()
        if check and res.returncode != 0:
            raise QemuBuildError(step, f"{Path(argv[0]).name} exited with status "
                                 f"{res.returncode}: {first_error(res.stdout.splitlines())}",
                                 self.log_path)
        return res

    @contextlib.contextmanager
    def step(self, step: Step, message: str) -> Iterator[None]:
        self.progress(step, message, None, None)
        self.note(f"step {step}: {message}")
        t0 = time.monotonic()
        yield
        self.steps[str(step)] = time.monotonic() - t0

    # -- steps ------------------------------------------------------------------------------
    def fetch(self) -> Path:
        """The orig tarball in ``qemu/src/`` (downloaded once)."""
        cache = self.root / "src" / BASE.tarball
        with self.step(Step.FETCH, f"{BASE.package}={BASE.version} orig tarball"):
            if cache.is_file():
                self.note(f"cached: {cache}")
                return cache
            dl = self.root / "src" / f".download-{os.getpid()}"
            shutil.rmtree(dl, ignore_errors=True)
            dl.mkdir(parents=True)
            try:
                res = self.run(Step.FETCH, ["apt-get", "source", "--download-only", "-q",
                                            f"{BASE.package}={BASE.version}"],
                               cwd=dl, check=False)
                got = dl / BASE.tarball
                if not got.is_file():
                    raise QemuBuildError(
                        Step.FETCH, f"apt-get source {BASE.package}={BASE.version} did not fetch "
                        f"{BASE.tarball} (exit {res.returncode}: "
                        f"{first_error(res.stdout.splitlines())}); deb-src for "
                        "bookworm-backports missing? run scripts/setup-host.sh", self.log_path)
                # apt-get exits 100 when the .dsc/.debian.tar.xz are 404: the verify step
                # decides whether the tarball alone is good.
                self.note(f"apt-get source exited {res.returncode}; tarball present")
                self.verify_file(got)
                got.rename(cache)
            finally:
                shutil.rmtree(dl, ignore_errors=True)
        return cache

    def verify_file(self, tarball: Path) -> None:
        res = self.run(Step.VERIFY, ["apt-cache", "showsrc", BASE.package], cwd=self.root)
        listed = parse_showsrc(res.stdout, BASE.version).get(BASE.tarball)
        if listed is None:
            raise QemuBuildError(Step.VERIFY, f"apt's Sources index has no {BASE.tarball} for "
                                 f"{BASE.package} {BASE.version} (deb-src for "
                                 "bookworm-backports; apt-get update)", self.log_path)
        if listed != BASE.sha256:
            raise QemuBuildError(Step.VERIFY, f"apt's Sources index lists sha256 {listed} for "
                                 f"{BASE.tarball}; hvtools pins {BASE.sha256}", self.log_path)
        actual = _sha256_file(tarball)
        if actual != listed:
            raise QemuBuildError(Step.VERIFY, f"{tarball} has sha256 {actual}, apt's Sources "
                                 f"index says {listed}", self.log_path)
        self.note(f"sha256 {actual} matches the Sources entry")

    def verify(self, tarball: Path) -> None:
        with self.step(Step.VERIFY, f"sha256 of {BASE.tarball}"):
            actual = _sha256_file(tarball)
            if actual != BASE.sha256:
                tarball.unlink()  # a damaged download: fetched again next time
                raise QemuBuildError(Step.VERIFY, f"cached {tarball} has sha256 {actual}, "
                                     f"expected {BASE.sha256} (removed; run again)",
                                     self.log_path)

    def extract(self, tarball: Path) -> Path:
        src = self.work / "src"
        with self.step(Step.EXTRACT, f"unpacking {BASE.tarball}"):
            # --no-same-owner: owned by us, or git refuses the tree ("dubious ownership").
            self.run(Step.EXTRACT, ["tar", "-xf", str(tarball), "--no-same-owner", "-C",
                                    str(self.work)], cwd=self.work)
            top = self.work / BASE.topdir
            if not top.is_dir():
                raise QemuBuildError(Step.EXTRACT, f"{BASE.tarball} has no {BASE.topdir}/",
                                     self.log_path)
            top.rename(src)
        return src

    def git(self, step: Step, src: Path, *args: str,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run(step, ["git", "-c", "user.name=hvtools qemu build",
                               "-c", "user.email=hvtools@localhost",
                               "-c", f"safe.directory={src}", "-c", "init.defaultBranch=base",
                               "-c", "core.autocrlf=false", "-c", "commit.gpgsign=false",
                               *args], cwd=src, check=check)

    def apply(self, src: Path) -> None:
        with self.step(Step.APPLY, f"{len(self.patches)} patch(es) with git am"):
            self.git(Step.APPLY, src, "init", "-q")
            self.git(Step.APPLY, src, "add", "-A", "-f")
            self.git(Step.APPLY, src, "commit", "-q", "--no-verify", "-m",
                     f"QEMU {BASE.upstream} ({BASE.tarball})")
            if not self.patches:
                return
            pdir = self.work / "patches"
            pdir.mkdir()
            files = []
            for p in self.patches:
                (pdir / p.name).write_bytes(p.data)
                files.append(str(pdir / p.name))
            res = self.git(Step.APPLY, src, "am", "-q", "--whitespace=nowarn", *files,
                           check=False)
            if res.returncode != 0:
                failed = re.search(r"Patch failed at (\d{4}) (.*)", res.stdout)
                which = (next((p.name for p in self.patches
                               if p.name.startswith(failed.group(1) + "-")), failed.group(2))
                         if failed else "the series")
                why = next((ln.strip() for ln in res.stdout.splitlines()
                            if ln.startswith(("error:", "fatal:"))), first_error(
                                res.stdout.splitlines()))
                raise QemuBuildError(Step.APPLY, f"{which} does not apply to QEMU "
                                     f"{BASE.upstream}: {why}", self.log_path)
            count = self.git(Step.APPLY, src, "rev-list", "--count", "HEAD").stdout.strip()
            self.note(f"{count} commits (base + {len(self.patches)})")

    def ensure_venv(self) -> Path:
        """A venv with meson and pycotap from PyPI, kept across builds."""
        python = self.venv / "bin" / "python3"
        stamp = self.venv / "hvtools-requirements.txt"
        want = "\n".join(BUILD_PYTHON_REQUIREMENTS) + "\n"
        with self.step(Step.VENV, "meson and pycotap for configure"):
            if python.exists() and stamp.is_file() and stamp.read_text() == want:
                return python
            shutil.rmtree(self.venv, ignore_errors=True)
            # The base interpreter, not hvtools' own venv (Debian's python3 with python3-venv).
            base = getattr(sys, "_base_executable", sys.executable)
            self.run(Step.VENV, [base, "-m", "venv", str(self.venv)], cwd=self.root)
            self.run(Step.VENV, [str(python), "-m", "pip", "install", "-q",
                                 "--disable-pip-version-check", *BUILD_PYTHON_REQUIREMENTS],
                     cwd=self.root)
            stamp.write_text(want)
        return python

    def configure(self, src: Path, python: Path) -> Path:
        build = self.work / "build"
        with self.step(Step.CONFIGURE, "x86_64-softmmu, lean feature set"):
            meson = (src / "pc-bios" / "meson.build").read_text()
            for name in blob_placeholders(meson):
                blob = src / "pc-bios" / name
                if not blob.exists():
                    blob.write_bytes(bz2.compress(b""))
            build.mkdir()
            self.run(Step.CONFIGURE, [str(src / "configure"),
                                      *configure_args(self.root / self.key, python)], cwd=build)
        return build

    def compile(self, build: Path) -> None:
        with self.step(Step.BUILD, f"ninja -j{self.jobs} {TARGET}"):
            argv = ["ninja", "-j", str(self.jobs), TARGET]
            self.note(f"$ {' '.join(argv)}   (in {build})")
            proc = subprocess.Popen(argv, cwd=build, env=self.env(), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    errors="replace")
            assert proc.stdout is not None
            tail: list[str] = []
            try:
                for line in proc.stdout:
                    self.log.write(line)
                    nn = parse_ninja_progress(line)
                    if nn is not None:
                        self.progress(Step.BUILD, line[line.index("]") + 1:].strip(), *nn)
                    else:
                        tail = [*tail[-200:], line.rstrip("\n")]
                code = proc.wait()
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            self.log.flush()
            if code != 0:
                raise QemuBuildError(Step.BUILD, f"ninja exited with status {code}: "
                                     f"{first_error(tail)}", self.log_path)

    def install(self, build: Path) -> PatchedInstall:
        with self.step(Step.INSTALL, f"into {self.root / self.key}"):
            stage = self.work / "install"
            (stage / "bin").mkdir(parents=True)
            binary = stage / "bin" / TARGET
            shutil.copy2(build / TARGET, binary)
            ver = self.run(Step.INSTALL, [str(binary), "--version"], cwd=stage).stdout
            if f"version {BASE.upstream}" not in ver:
                raise QemuBuildError(Step.INSTALL, f"the built binary says {ver.strip()[:80]!r}, "
                                     f"not QEMU {BASE.upstream}", self.log_path)
            caps = capabilities(binary).to_json()
            caps.pop("path")
            manifest = {
                "key": self.key,
                "base": {"package": BASE.package, "version": BASE.version,
                         "upstream": BASE.upstream, "tarball": BASE.tarball,
                         "sha256": BASE.sha256},
                "patches": [{"name": p.name, "sha256": p.sha256} for p in self.patches],
                "configure": configure_args(self.root / self.key, self.venv / "bin" / "python3"),
                "version_text": ver.splitlines()[0] if ver else "",
                "capabilities": caps,
                "build_seconds": round(sum(self.steps.values()), 1),
                "step_seconds": {k: round(v, 1) for k, v in self.steps.items()},
                "jobs": self.jobs,
                "built_at": time.time(),
            }
            (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            self.log.flush()
            shutil.copy2(self.log_path, stage / "build.log")
            (stage / COMPLETE_STAMP).write_text(self.key + "\n")  # last: the install is whole
            final = self.root / self.key
            if final.exists():  # --force, or the leftover of a crash: out of the way first
                old = self.root / f".old-{self.key}-{os.getpid()}"
                final.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            stage.rename(final)
        inst = read_install(final)
        if inst is None:
            raise QemuBuildError(Step.INSTALL, f"{final} is not a complete install", self.log_path)
        return inst

    def run_all(self) -> PatchedInstall:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w") as log:
            self._log = log
            self.note(f"hvtools qemu build {self.key}: {len(self.patches)} patch(es), "
                      f"-j{self.jobs}")
            shutil.rmtree(self.work, ignore_errors=True)
            self.work.mkdir(parents=True)
            try:
                tarball = self.fetch()
                self.verify(tarball)
                src = self.extract(tarball)
                self.apply(src)
                python = self.ensure_venv()
                build = self.configure(src, python)
                self.compile(build)
                return self.install(build)
            except QemuBuildError as err:
                self.note(f"FAILED: {err}")
                raise
            finally:
                shutil.rmtree(self.work, ignore_errors=True)
                self._log = None


@contextlib.contextmanager
def _build_lock(root: Path, progress: Progress) -> Iterator[None]:
    """One build at a time per ``$HVTOOLS_HOME`` (each takes both cores for minutes)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            progress(Step.FETCH, f"waiting for another qemu build (pid {holder})", None, None)
            fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()


def build(*, patches_dir: Path | None = None, jobs: int | None = None, force: bool = False,
          progress: Progress = lambda *_: None) -> BuildResult:
    """Build (or find cached) the patched QEMU for the series in ``patches_dir``."""
    if jobs is not None and jobs < 1:
        raise UsageError(f"--jobs {jobs}: need at least 1")
    patches = read_series(patches_dir or default_patches_dir())
    key = series_key(BASE.sha256, patches)
    root = qemu_root()
    t0 = time.monotonic()
    if not force and (inst := read_install(root / key)) is not None:
        return BuildResult(inst, cached=True, seconds=time.monotonic() - t0, steps={})
    check_build_dependencies()
    with _build_lock(root, progress):
        # Whoever held the lock may just have built this very series.
        if not force and (inst := read_install(root / key)) is not None:
            return BuildResult(inst, cached=True, seconds=time.monotonic() - t0, steps={})
        for stale in root.glob(".build-*"):  # an interrupted build's tree (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        builder = _Builder(patches, key, jobs or os.cpu_count() or 1, progress)
        inst = builder.run_all()
    return BuildResult(inst, cached=False, seconds=time.monotonic() - t0, steps=builder.steps)
