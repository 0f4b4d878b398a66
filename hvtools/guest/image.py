"""Build and find the guest image: Debian's cloud kernel plus a busybox initramfs with the agent.

An image lives in ``paths.images_dir()/<key>/``, ``key`` being a short hash of every input (the
kernel package and its .deb's sha256, the busybox-static version, the bytes of ``src/``, the
module lists, the format version)::

    <key>/manifest.json          what was built from what (written last; marks a complete image)
    <key>/vmlinuz                the kernel, as shipped in the .deb
    <key>/initrd.img             newc cpio: busybox, /init, static helpers, boot modules
    <key>/config                 the kernel's build config
    <key>/lib/modules/<ver>/     the whole module tree of the .deb, depmod'ed
    <key>/bin/<helper>           the static helpers compiled from src/*.c

``images_dir()/current`` is a symlink to the newest key. Builds happen in a temporary directory
that is renamed into place, so a failed build leaves nothing behind.

A *variant* (``build_image(variant=...)`` or ``$HVTOOLS_IMAGE_VARIANT``) is the same recipe on
another kernel, plus out-of-tree modules from ``kmod/<name>/`` compiled on the host against that
kernel's ``linux-headers`` packages (downloaded and unpacked, never installed) and shipped under
``lib/modules/<ver>/extra/``. Its key also covers the headers and the module sources; its symlink
is ``current-<variant>``, so building it never moves ``current``. The ``pasid`` variant runs
bookworm's 6.12 cloud kernel (``iommu_attach_device_pasid`` appeared in 6.2) with ``hvtpasid``.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hvtools import paths
from hvtools.errors import DependencyError, ImageError

#: Bump when the layout or the build recipe changes, so old keys are not reused.
FORMAT_VERSION = 1
META_PACKAGE = "linux-image-cloud-amd64"
KERNEL_PACKAGE_ENV = "HVTOOLS_KERNEL_PACKAGE"
VARIANT_ENV = "HVTOOLS_IMAGE_VARIANT"
BUSYBOX_PACKAGE = "busybox-static"
#: Modules /init loads at every boot (when they are not built in).
BOOT_MODULES = ("virtio_pci", "virtio_console", "button", "evdev")
#: Modules shipped in the initramfs for later use (``modprobe`` in the guest).
EXTRA_MODULES = (
    "virtio_blk",
    "virtio_net",
    "virtio_rng",
    "vmw_vsock_virtio_transport",
    "virtiofs",
    "kvm",
    "kvm_amd",
    "vfio",
    "vfio_pci",
    "vfio_iommu_type1",
)
#: initrd compression. Measured under TCG (boot to /init, 8 runs each): none, gzip, lz4 and zstd
#: within 50 ms of each other, xz 0.35 s slower; "none" needs no tool and is never slower.
INITRD_COMPRESSION = "none"
SRC_DIR = Path(__file__).parent / "src"
KMOD_DIR = Path(__file__).parent / "kmod"
Progress = Callable[[str], None]


@dataclass(frozen=True)
class ImageVariant:
    """A kernel other than the default, and the out-of-tree modules (``kmod/<name>/``) built
    against it. ``meta`` is a Debian meta package whose Depends names the kernel package."""

    name: str
    meta: str
    kmods: tuple[str, ...]


VARIANTS = {
    # bookworm(-security)'s linux-6.12 line: iommu_paging_domain_alloc (6.11) and
    # iommu_attach_device_pasid with an attach handle (6.11) are exported, IOMMUFD is not built.
    "pasid": ImageVariant("pasid", "linux-image-6.12-cloud-amd64", ("hvtpasid",)),
}


@dataclass(frozen=True)
class GuestImage:
    """A built guest image (kernel, initramfs, modules and helpers)."""

    key: str
    root: Path
    kernel: Path
    initrd: Path
    kernel_version: str
    kernel_package: str
    modules: Path
    helpers: Mapping[str, Path] = field(default_factory=dict, hash=False)

    def to_json(self) -> dict[str, object]:
        """A JSON-ready description (paths as strings)."""
        return {
            "key": self.key,
            "root": str(self.root),
            "kernel": str(self.kernel),
            "initrd": str(self.initrd),
            "kernel_version": self.kernel_version,
            "kernel_package": self.kernel_package,
            "modules": str(self.modules),
            "helpers": {name: str(p) for name, p in sorted(self.helpers.items())},
        }


@dataclass(frozen=True)
class _Inputs:
    package: str
    version: str
    deb: Path
    deb_sha256: str
    busybox: Path
    busybox_version: str
    sources: dict[str, str]  # file name -> sha256
    variant: ImageVariant | None = None
    headers: tuple[Path, ...] = ()  # linux-headers debs (variants only)
    kmod_sources: dict[str, str] = field(default_factory=dict)  # "name/file" -> sha256

    def key_material(self) -> dict[str, object]:
        material = self._base_material()
        if self.variant is not None:  # the default image's key material stays as it was
            material["variant"] = self.variant.name
            material["headers"] = {p.name: _sha256(p) for p in self.headers}
            material["kmods"] = self.kmod_sources
        return material

    def _base_material(self) -> dict[str, object]:
        return {
            "format": FORMAT_VERSION,
            "kernel_package": self.package,
            "kernel_version": self.version,
            "deb_sha256": self.deb_sha256,
            "busybox_version": self.busybox_version,
            "sources": self.sources,
            "boot_modules": list(BOOT_MODULES),
            "extra_modules": list(EXTRA_MODULES),
            "compression": INITRD_COMPRESSION,
        }

    @property
    def key(self) -> str:
        blob = json.dumps(self.key_material(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# -- public API ---------------------------------------------------------------------------------


def build_image(*, force: bool = False, progress: Progress | None = None,
                variant: str | None = None) -> GuestImage:
    """Build the guest image, or return the cached one whose inputs match.

    ``variant`` (default ``$HVTOOLS_IMAGE_VARIANT``, else none) names an entry of VARIANTS.
    Raises DependencyError when a host tool is missing (naming the Debian package) and
    ImageError when the build fails.
    """
    say: Progress = progress or (lambda _msg: None)
    chosen = _variant(variant)
    _check_tools()
    inputs = _gather_inputs(say, chosen)
    key = inputs.key
    link = _current_name(chosen)
    root = paths.images_dir() / key
    if not force and _complete(root):
        _point_current(key, link)
        return _load(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(root.parent):
        if not force and _complete(root):
            _point_current(key, link)
            return _load(root)
        _remove_leftovers(root.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=root.parent))
        tmp.chmod(0o755)
        try:
            try:
                _build(inputs, key, tmp, say)
            except OSError as err:
                raise ImageError(f"building the guest image {key} failed: {err}") from err
            if root.exists():
                old = root.with_name(f".old-{key}-{os.getpid()}")
                root.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            tmp.rename(root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    _point_current(key, link)
    say(f"image {key} ready in {root}")
    return _load(root)


def find_image(variant: str | None = None) -> GuestImage:
    """The image ``images_dir()/current`` (``current-<variant>`` for a variant, default
    ``$HVTOOLS_IMAGE_VARIANT``) points to; ImageError when there is none."""
    chosen = _variant(variant)
    current = paths.images_dir() / _current_name(chosen)
    root = current.resolve() if current.is_symlink() else current
    if not _complete(root):
        how = "" if chosen is None else f"{VARIANT_ENV}={chosen.name} "
        raise ImageError(f"no {'guest' if chosen is None else chosen.name + ' guest'} image "
                         f"under {paths.images_dir()}; run `{how}hvtools image build`")
    return _load(root)


def _variant(name: str | None) -> ImageVariant | None:
    chosen = (name if name is not None else os.environ.get(VARIANT_ENV, "")).strip()
    if not chosen:
        return None
    if chosen not in VARIANTS:
        raise ImageError(f"unknown image variant {chosen!r} (known: {', '.join(sorted(VARIANTS))})")
    return VARIANTS[chosen]


def _current_name(variant: ImageVariant | None) -> str:
    return "current" if variant is None else f"current-{variant.name}"


# -- inputs -------------------------------------------------------------------------------------


def _check_tools() -> None:
    for tool, package in (
        ("gcc", "gcc"),
        ("depmod", "kmod"),
        ("modprobe", "kmod"),
        ("dpkg-deb", "dpkg"),
        ("apt-get", "apt"),
        ("apt-cache", "apt"),
    ):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            raise DependencyError(f"`{tool}` not found; install the Debian package {package}")


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    return str(Path("/usr/sbin", name))


def _gather_inputs(say: Progress, variant: ImageVariant | None = None) -> _Inputs:
    package, version = resolve_kernel_package(say, variant)
    deb = _download_deb(package, version, say)
    busybox, bb_version = _busybox()
    sources = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(SRC_DIR.iterdir())
        if p.is_file()
    }
    if "init" not in sources:
        raise ImageError(f"{SRC_DIR}/init is missing; the hvtools install is broken")
    if variant is None:
        return _Inputs(package, version, deb, _sha256(deb), busybox, bb_version, sources)
    headers = tuple(_download_deb(p, v, say) for p, v in _headers_packages(package, version, say))
    kmod_sources: dict[str, str] = {}
    for name in variant.kmods:
        d = KMOD_DIR / name
        if not (d / "Kbuild").is_file():
            raise ImageError(f"{d}/Kbuild is missing; the hvtools install is broken")
        for p in sorted(d.iterdir()):
            if p.is_file():
                kmod_sources[f"{name}/{p.name}"] = _sha256(p)
    return _Inputs(package, version, deb, _sha256(deb), busybox, bb_version, sources,
                   variant, headers, kmod_sources)


def resolve_kernel_package(say: Progress | None = None,
                           variant: ImageVariant | None = None) -> tuple[str, str]:
    """The (package, version) to boot: ``$HVTOOLS_KERNEL_PACKAGE`` (``name`` or ``name=ver``),
    else what the variant's meta package depends on, else what bookworm's
    ``linux-image-cloud-amd64`` depends on (never a backports build)."""
    override = os.environ.get(KERNEL_PACKAGE_ENV, "").strip()
    if override:
        name, _, version = override.partition("=")
        if not re.fullmatch(r"linux-image-[\w.+~-]+", name):
            raise ImageError(f"{KERNEL_PACKAGE_ENV}={override!r} is not a linux-image package")
        return name, version or _candidate(name, say)
    if variant is not None:
        return _resolve_meta_candidate(variant.meta, say)
    return _resolve_meta(say)


def _resolve_meta_candidate(meta: str, say: Progress | None) -> tuple[str, str]:
    """The kernel package that apt's candidate of ``meta`` depends on (exact version)."""
    version = _candidate(meta, say)
    text = _apt_cache(["show", f"{meta}={version}"], say)
    dep = re.search(r"^Depends: .*?(linux-image-[\w.+~-]+)\s*\(=\s*([^)\s]+)\)", text, re.M)
    if dep is None:
        raise ImageError(f"{meta}={version} depends on no exact linux-image version")
    return dep.group(1), dep.group(2)


def _headers_packages(package: str, version: str,
                      say: Progress | None) -> list[tuple[str, str]]:
    """The debs that make a module build tree for ``package``: its ``linux-headers`` package
    and the ``-common`` and ``linux-kbuild`` packages that one depends on."""
    name = "linux-headers-" + package.removeprefix("linux-image-").removesuffix("-unsigned")
    text = _apt_cache(["show", f"{name}={version}"], say)
    depends = next((m.group(1) for m in re.finditer(r"^Depends: (.*)$", text, re.M)), "")
    wanted = [(name, version)]
    for dep in re.findall(r"(linux-(?:headers|kbuild)-[\w.+~-]+)(?:\s*\(=\s*([^)\s]+)\))?",
                          depends):
        wanted.append((dep[0], dep[1] or version))
    if len(wanted) < 2:
        raise ImageError(f"{name}={version} depends on no linux-headers/linux-kbuild package")
    return wanted


def _apt_cache(args: Sequence[str], say: Progress | None, *, retried: bool = False) -> str:
    proc = subprocess.run(["apt-cache", *args], capture_output=True, text=True, check=False)
    if proc.returncode == 0 and proc.stdout.strip():
        return proc.stdout
    if not retried:
        _apt_update(say)
        return _apt_cache(args, say, retried=True)
    raise ImageError(
        f"`apt-cache {' '.join(args)}` found nothing: {proc.stderr.strip() or 'no output'}"
    )


def _resolve_meta(say: Progress | None) -> tuple[str, str]:
    text = _apt_cache(["show", META_PACKAGE], say)
    best: tuple[str, str, str] | None = None  # (meta version, package, version)
    for stanza in text.split("\n\n"):
        fields = dict(re.findall(r"^(Version|Depends): (.*)$", stanza, re.M))
        meta_version = fields.get("Version", "")
        if not meta_version or "bpo" in meta_version:
            continue
        dep = re.search(r"(linux-image-[\w.+~-]+)\s*\(=\s*([^)\s]+)\)", fields.get("Depends", ""))
        if dep is None:
            continue
        if best is None or _version_gt(meta_version, best[0]):
            best = (meta_version, dep.group(1), dep.group(2))
    if best is None:
        raise ImageError(f"no bookworm version of {META_PACKAGE} in the apt lists")
    return best[1], best[2]


def _candidate(name: str, say: Progress | None) -> str:
    text = _apt_cache(["policy", name], say)
    m = re.search(r"Candidate:\s*(\S+)", text)
    if m is None or m.group(1) == "(none)":
        raise ImageError(f"apt has no candidate version of {name}")
    return m.group(1)


def _version_gt(a: str, b: str) -> bool:
    return subprocess.run(["dpkg", "--compare-versions", a, "gt", b], check=False).returncode == 0


def _apt_update(say: Progress | None) -> None:
    if say:
        say("apt-get update")
    proc = subprocess.run(["apt-get", "update"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ImageError(f"apt-get update failed: {_tail(proc.stderr)}")


def _deb_name(package: str, version: str) -> str:
    return f"{package}_{version.replace(':', '%3a')}_amd64.deb"


def _download_deb(package: str, version: str, say: Progress) -> Path:
    debs = paths.cache_dir() / "debs"
    target = debs / _deb_name(package, version)
    if target.is_file():
        return target
    debs.mkdir(parents=True, exist_ok=True)
    say(f"downloading {package}={version}")
    with tempfile.TemporaryDirectory(prefix=".dl-", dir=debs) as tmp:
        for attempt in (1, 2):
            proc = subprocess.run(
                ["apt-get", "download", f"{package}={version}"],
                cwd=tmp, capture_output=True, text=True, check=False,
            )
            if proc.returncode == 0:
                break
            if attempt == 1 and re.search(
                r"Unable to locate|Can't select version|not available|Failed to fetch",
                proc.stderr,
            ):
                _apt_update(say)
                continue
            raise ImageError(f"apt-get download {package}={version} failed: {_tail(proc.stderr)}")
        got = sorted(Path(tmp).glob("*.deb"))
        if len(got) != 1:
            raise ImageError(f"apt-get download {package}={version} left {len(got)} .deb files")
        got[0].rename(target)
    return target


def _busybox() -> tuple[Path, str]:
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Status}\t${Version}", BUSYBOX_PACKAGE],
        capture_output=True, text=True, check=False,
    )
    status, _, version = proc.stdout.partition("\t")
    if proc.returncode != 0 or not status.endswith(" installed"):
        raise DependencyError(
            f"{BUSYBOX_PACKAGE} is not installed; install the Debian package {BUSYBOX_PACKAGE}"
        )
    for candidate in (Path("/bin/busybox"), Path("/usr/bin/busybox")):
        if candidate.is_file():
            return candidate, version
    raise DependencyError(f"{BUSYBOX_PACKAGE} is installed but /bin/busybox is missing")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(functools.partial(f.read, 1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- the build ----------------------------------------------------------------------------------


def _build(inputs: _Inputs, key: str, root: Path, say: Progress) -> None:
    started = time.monotonic()
    say(f"extracting {inputs.deb.name}")
    deb_root = root / ".deb"
    _run(["dpkg-deb", "-x", str(inputs.deb), str(deb_root)], "dpkg-deb -x")
    vmlinuz = sorted((deb_root / "boot").glob("vmlinuz-*"))
    if len(vmlinuz) != 1:
        raise ImageError(f"{inputs.deb.name} holds {len(vmlinuz)} vmlinuz files, expected 1")
    kver = vmlinuz[0].name.removeprefix("vmlinuz-")
    vmlinuz[0].rename(root / "vmlinuz")
    config = deb_root / "boot" / f"config-{kver}"
    if config.is_file():
        config.rename(root / "config")
    src_modules = next(
        (p for p in (deb_root / "lib/modules" / kver, deb_root / "usr/lib/modules" / kver)
         if p.is_dir()),
        None,
    )
    if src_modules is None:
        raise ImageError(f"{inputs.deb.name} has no lib/modules/{kver}")
    modules = root / "lib/modules" / kver
    modules.parent.mkdir(parents=True)
    src_modules.rename(modules)
    shutil.rmtree(deb_root)
    _run([_tool("depmod"), "-b", str(root), kver], "depmod")

    helpers = _compile_helpers(root / "bin", say)
    kmods: tuple[str, ...] = ()
    if inputs.variant is not None:
        kmods = inputs.variant.kmods
        _build_kmods(inputs, kver, root, say)
        _run([_tool("depmod"), "-b", str(root), kver], "depmod (extra modules)")

    say("building initramfs")
    stage = root / ".initramfs"
    module_report = _stage_initramfs(stage, root, kver, inputs.busybox, helpers, kmods)
    initrd = root / "initrd.img"
    _write_initrd(stage, initrd)
    shutil.rmtree(stage)

    manifest = {
        "format": FORMAT_VERSION,
        "key": key,
        "kernel": "vmlinuz",
        "initrd": "initrd.img",
        "initrd_compression": INITRD_COMPRESSION,
        "kernel_version": kver,
        "kernel_package": f"{inputs.package}={inputs.version}",
        "modules": f"lib/modules/{kver}",
        "helpers": {name: f"bin/{name}" for name in sorted(helpers)},
        "boot_modules": module_report["boot"],
        "extra_modules": module_report["extra"],
        "sizes": {
            "kernel": (root / "vmlinuz").stat().st_size,
            "initrd": initrd.stat().st_size,
        },
        "inputs": {**inputs.key_material(), "deb": inputs.deb.name},
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(time.monotonic() - started, 2),
    }
    if inputs.variant is not None:
        manifest["variant"] = inputs.variant.name
        manifest["kmods"] = {name: f"lib/modules/{kver}/extra/{name}.ko" for name in kmods}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _compile_helpers(bindir: Path, say: Progress) -> dict[str, Path]:
    bindir.mkdir(parents=True, exist_ok=True)
    helpers: dict[str, Path] = {}
    for src in sorted(SRC_DIR.glob("*.c")):
        say(f"compiling {src.name}")
        out = bindir / src.stem
        proc = subprocess.run(
            ["gcc", "-static", "-O2", "-Wall", "-Wextra", "-o", str(out), str(src)],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0:
            if "cannot find -lc" in proc.stderr:
                raise DependencyError(
                    "gcc cannot link statically; install the Debian package libc6-dev"
                )
            raise ImageError(f"gcc failed on {src.name}: {_tail(proc.stderr)}")
        helpers[src.stem] = out
    return helpers


def _build_kmods(inputs: _Inputs, kver: str, root: Path, say: Progress) -> None:
    """Compile the variant's kmod/<name>/ trees against the unpacked headers debs and put the
    .ko files under ``root/lib/modules/<kver>/extra/``. ``src/`` is on the include path (the
    helpers and the modules share their ioctl headers there)."""
    assert inputs.variant is not None
    if shutil.which("make") is None:
        raise DependencyError("`make` not found; install the Debian package make")
    tree = root / ".headers"
    for deb in inputs.headers:
        _run(["dpkg-deb", "-x", str(deb), str(tree)], f"dpkg-deb -x {deb.name}")
    kdir = tree / "usr/src" / f"linux-headers-{kver}"
    makefile = kdir / "Makefile"
    if not makefile.is_file():
        raise ImageError(f"the headers debs hold no usr/src/linux-headers-{kver}")
    # Debian's per-flavour Makefile includes the -common one by its installed path.
    makefile.write_text(re.sub(r"^include /usr/src/", f"include {tree}/usr/src/",
                               makefile.read_text(), flags=re.M))
    cc = re.search(r"^CC = .*\(CROSS_COMPILE\)(gcc-\d+)", _read(kdir / ".kernelvariables"), re.M)
    if cc and shutil.which(f"x86_64-linux-gnu-{cc.group(1)}") is None:
        raise DependencyError(f"{kver} modules are built with {cc.group(1)}; install the Debian "
                              f"package {cc.group(1)}")
    extra = root / "lib/modules" / kver / "extra"
    extra.mkdir(parents=True, exist_ok=True)
    for name in inputs.variant.kmods:
        say(f"compiling kernel module {name} for {kver}")
        work = root / ".kmod" / name
        shutil.copytree(KMOD_DIR / name, work)
        # No BTF for the module (it would need pahole, the dwarves package): it loads without.
        _run(["make", "-C", str(kdir), f"M={work}", f"HVTOOLS_SRC={SRC_DIR}",
              "CONFIG_DEBUG_INFO_BTF_MODULES=", "modules"], f"building kernel module {name}")
        built = work / f"{name}.ko"
        if not built.is_file():
            raise ImageError(f"building kernel module {name} produced no {name}.ko")
        shutil.copy2(built, extra / built.name)
    shutil.rmtree(root / ".kmod")
    shutil.rmtree(tree)


def _module_closure(root: Path, kver: str, name: str) -> tuple[str, list[Path]]:
    """("builtin", []) or ("module", [.ko files in load order]) for one module name."""
    proc = subprocess.run(
        [_tool("modprobe"), "-d", str(root), "-S", kver, "--show-depends", name],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise ImageError(f"kernel {kver} has no module {name!r}: {_tail(proc.stderr)}")
    files: list[Path] = []
    kind = ""
    for line in proc.stdout.splitlines():
        words = line.split()
        if words[:1] == ["builtin"]:
            kind = "builtin" if words[1:2] == [name] else kind
        elif words[:1] == ["insmod"] and len(words) > 1:
            p = Path(words[1])
            if p not in files:
                files.append(p)
    return ("module" if files else kind if kind == "builtin" else "missing"), files


def _stage_initramfs(
    stage: Path, root: Path, kver: str, busybox: Path, helpers: Mapping[str, Path],
    kmods: Sequence[str] = (),
) -> dict[str, dict[str, str]]:
    """Lay out the initramfs tree in ``stage``; return how each module is provided."""
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "run",
              "root", "mnt", "var/tmp", f"lib/modules/{kver}"):
        (stage / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, stage / "bin/busybox")
    listing = _run([str(busybox), "--list-full"], "busybox --list-full")
    for applet in listing.split():
        if "/" not in applet or applet == "bin/busybox":
            continue
        link = stage / applet
        if not link.exists() and not link.is_symlink():
            link.symlink_to("/bin/busybox")
    for name, path in helpers.items():
        shutil.copy2(path, stage / "bin" / name)
    shutil.copy2(SRC_DIR / "init", stage / "init")
    (stage / "init").chmod(0o755)
    (stage / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (stage / "etc/group").write_text("root:x:0:\ntty:x:5:\n")
    (stage / "etc/hostname").write_text("hvguest\n")
    (stage / "etc/mtab").symlink_to("/proc/mounts")

    report: dict[str, dict[str, str]] = {"boot": {}, "extra": {}}
    mod_src = root / "lib/modules" / kver
    mod_dst = stage / "lib/modules" / kver
    for group, names in (("boot", BOOT_MODULES), ("extra", (*EXTRA_MODULES, *kmods))):
        for name in names:
            kind, files = _module_closure(root, kver, name)
            report[group][name] = kind
            for f in files:
                rel = f.relative_to(mod_src)
                _copy_module(f, mod_dst / rel)
    for meta in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
        if (mod_src / meta).is_file():
            shutil.copy2(mod_src / meta, mod_dst / meta)
    _run([_tool("depmod"), "-b", str(stage), kver], "depmod (initramfs)")
    return report


def _copy_module(src: Path, dst: Path) -> None:
    """Copy one module, decompressed: busybox modprobe loads plain .ko files only."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    name = src.name
    if name.endswith(".ko"):
        shutil.copy2(src, dst)
    elif name.endswith(".ko.xz"):
        dst.with_suffix("").write_bytes(lzma.decompress(src.read_bytes()))
    elif name.endswith(".ko.gz"):
        dst.with_suffix("").write_bytes(gzip.decompress(src.read_bytes()))
    elif name.endswith(".ko.zst"):
        if shutil.which("zstd") is None:
            raise DependencyError(f"{name} is zstd-compressed; install the Debian package zstd")
        out = dst.with_suffix("")
        _run(["zstd", "-q", "-d", "-f", "-o", str(out), str(src)], f"zstd -d {name}")
    else:
        raise ImageError(f"unexpected module file {src}")


# -- newc cpio ----------------------------------------------------------------------------------


def _newc(name: str, mode: int, data: bytes, ino: int, rdev: tuple[int, int] = (0, 0)) -> bytes:
    """One newc ("070701") cpio entry; uid/gid 0, mtime 0 so the archive is reproducible."""
    raw_name = name.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(mode) else 1
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(raw_name), 0)
    head = b"070701" + b"".join(b"%08X" % v for v in fields) + raw_name
    head += b"\0" * (-len(head) % 4)
    return head + data + b"\0" * (-len(data) % 4)


def _walk(stage: Path) -> Iterator[tuple[str, Path]]:
    for dirpath, dirnames, filenames in os.walk(stage):
        dirnames.sort()
        base = Path(dirpath)
        for name in sorted(dirnames + filenames):
            p = base / name
            yield p.relative_to(stage).as_posix(), p


def _cpio(stage: Path) -> bytes:
    parts: list[bytes] = []
    ino = 1
    for rel, p in _walk(stage):
        st = p.lstat()
        perm = stat.S_IMODE(st.st_mode)
        if stat.S_ISLNK(st.st_mode):
            parts.append(_newc(rel, stat.S_IFLNK | 0o777, os.readlink(p).encode(), ino))
        elif stat.S_ISDIR(st.st_mode):
            parts.append(_newc(rel, stat.S_IFDIR | perm, b"", ino))
        elif stat.S_ISREG(st.st_mode):
            parts.append(_newc(rel, stat.S_IFREG | perm, p.read_bytes(), ino))
        ino += 1
    parts.append(_newc("dev/console", stat.S_IFCHR | 0o600, b"", ino, (5, 1)))
    parts.append(_newc("TRAILER!!!", 0, b"", 0))
    return b"".join(parts)


def _write_initrd(stage: Path, out: Path) -> None:
    archive = _cpio(stage)
    if INITRD_COMPRESSION == "gzip":
        archive = gzip.compress(archive, compresslevel=6, mtime=0)
    elif INITRD_COMPRESSION == "xz":
        archive = lzma.compress(archive, check=lzma.CHECK_CRC32)
    elif INITRD_COMPRESSION != "none":
        raise ImageError(f"unknown initrd compression {INITRD_COMPRESSION!r}")
    out.write_bytes(archive)


# -- cache bookkeeping --------------------------------------------------------------------------


def _complete(root: Path) -> bool:
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(manifest, dict)
        and manifest.get("format") == FORMAT_VERSION
        and (root / "vmlinuz").is_file()
        and (root / "initrd.img").is_file()
    )


def _load(root: Path) -> GuestImage:
    try:
        m = json.loads((root / "manifest.json").read_text())
        return GuestImage(
            key=str(m["key"]),
            root=root,
            kernel=root / str(m["kernel"]),
            initrd=root / str(m["initrd"]),
            kernel_version=str(m["kernel_version"]),
            kernel_package=str(m["kernel_package"]),
            modules=root / str(m["modules"]),
            helpers={str(k): root / str(v) for k, v in dict(m["helpers"]).items()},
        )
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ImageError(f"guest image manifest {root / 'manifest.json'} is unreadable") from err


def _point_current(key: str, link: str = "current") -> None:
    current = paths.images_dir() / link
    if current.is_symlink() and os.readlink(current) == key:
        return
    tmp = current.with_name(f".current-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    tmp.symlink_to(key)
    tmp.replace(current)


def _remove_leftovers(directory: Path) -> None:
    """Drop half-made trees of builds that died (only called with the build lock held)."""
    for pattern in (".build-*", ".old-*"):
        for stale in directory.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    with (directory / ".build.lock").open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(cmd: Sequence[str], what: str) -> str:
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    except OSError as err:
        raise ImageError(f"{what}: cannot run {cmd[0]}: {err}") from err
    if proc.returncode != 0:
        raise ImageError(f"{what} failed (exit {proc.returncode}): {_tail(proc.stderr)}")
    return proc.stdout


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _tail(text: str, lines: int = 5) -> str:
    return " | ".join(text.strip().splitlines()[-lines:]) or "no output"
