"""Fixture ladder over real resources: image → driver → booted VM.

Integration tests use the real guest image (built once, cached under $HVTOOLS_HOME), real QEMU
under TCG and a real libvirtd that the libvirt fixture starts when none runs. VM names carry the
test run's pid so leftovers of an earlier run can never be mistaken for this run's.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hvtools.control.driver import Driver
from hvtools.control.drivers import make_driver
from hvtools.guest.image import GuestImage, build_image

RUN = f"t{os.getpid() % 100000}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def image() -> GuestImage:
    if os.geteuid() != 0:
        pytest.fail("integration tests need root (QEMU, libvirtd, namespaces); run as root")
    return build_image()


@pytest.fixture(params=["qemu", "libvirt"])
def driver(request: pytest.FixtureRequest, image: GuestImage) -> Driver:
    return make_driver(request.param)


class VmFactory:
    """Creates uniquely named VMs and always tears them down, dumping logs on failure."""

    def __init__(self, driver: Driver, request: pytest.FixtureRequest) -> None:
        self.driver = driver
        self.request = request
        self.names: list[str] = []

    def name(self, suffix: str) -> str:
        n = f"{RUN}-{self.driver.name[:2]}-{suffix}"
        self.names.append(n)
        return n

    def cleanup(self) -> None:
        from hvtools.errors import HvError

        for n in self.names:
            try:
                vm = self.driver.info(n)
            except HvError:
                continue
            rep = getattr(self.request.node, "rep_call", None)
            if rep is not None and rep.failed and vm.console_log and vm.console_log.exists():
                sys.stderr.write(f"--- console of {n} ---\n"
                                 + vm.console_log.read_text(errors="replace")[-4000:])
            with contextlib.suppress(HvError):
                self.driver.kill(n)
            with contextlib.suppress(HvError):
                self.driver.undefine(n)


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture
def vms(driver: Driver, request: pytest.FixtureRequest) -> Iterator[VmFactory]:
    f = VmFactory(driver, request)
    yield f
    f.cleanup()


def hvtools_cli(*args: str, env: dict[str, str] | None = None,
                input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a subprocess, as a user would."""
    exe = Path(sys.executable).with_name("hvtools")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})}, input=None if input is None
                          else input.decode())


def qemu_pids_for(name: str) -> list[int]:
    """Pids of QEMU processes whose command line names this VM."""
    out = subprocess.run(["pgrep", "-f", f"qemu-system-x86_64 -name (guest=)?{name}[ ,]"],
                         capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]
