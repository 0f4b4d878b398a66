"""Lab hosts on real network namespaces: `lab up|status|down`, the host agents, VMs on a host.

Every test builds its own lab, named after the test run's pid, on a subnet nobody else uses, and
always tears it down. "Nothing left behind" is checked against this lab's own names (other
streams build labs concurrently on the same machine).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hvtools.errors import HostDownError, HvError, LabError, UnknownHostError
from hvtools.lab import build
from hvtools.lab.hosts import (
    Lab,
    host_dir,
    lab_dir,
    lab_memory_root,
    load_lab,
    netns_inode,
    netns_path,
    pid_alive,
    rpc_unix,
)
from hvtools.lab.spec import parse_lab_toml
from tests.integration.conftest import RUN, hvtools_cli

SUBNET_BASE = "10.213"
_labs = itertools.count(1)


def _spec_text(name: str, *, link: str = "veth", third: int = 7, libvirt: bool = False) -> str:
    return (f'name = "{name}"\nlink = "{link}"\nsubnet = "{SUBNET_BASE}.{third}.0/24"\n'
            f'libvirt = {"true" if libvirt else "false"}\n'
            f'[[host]]\nname = "h1"\naddress = "{SUBNET_BASE}.{third}.1"\n'
            f'[[host]]\nname = "h2"\naddress = "{SUBNET_BASE}.{third}.2"\n')


def _lab_traces(name: str) -> dict[str, Any]:
    """Everything of lab ``name`` that can exist outside its processes' memory."""
    netns = sorted(p.name for p in Path("/run/netns").glob(f"hv-{name}-*")) \
        if Path("/run/netns").exists() else []
    procs = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                cmd = (entry / "cmdline").read_bytes()
                if str(lab_dir(name)).encode() in cmd or f"lab-{name}/".encode() in cmd:
                    procs.append(int(entry.name))
    files = [str(p) for d in (lab_dir(name), lab_memory_root(name)) if d.exists()
             for p in [d, *d.rglob("*")]]
    return {"netns": netns, "procs": procs, "files": files}


def _root_links() -> set[str]:
    return set(os.listdir("/sys/class/net"))


@pytest.fixture
def lab_name() -> Iterator[str]:
    name = f"{RUN}-l{next(_labs)}"
    yield name
    with contextlib.suppress(HvError):
        build.lab_down(name)


@pytest.fixture
def lab(lab_name: str, tmp_path: Path) -> Lab:
    spec = tmp_path / "lab.toml"
    spec.write_text(_spec_text(lab_name))
    res = hvtools_cli("lab", "up", str(spec), "--json")
    assert res.returncode == 0, res.stderr
    return load_lab(lab_name)


def test_up_status_down_leaves_nothing(lab_name: str, tmp_path: Path) -> None:
    before, links_before = _lab_traces(lab_name), _root_links()
    assert before == {"netns": [], "procs": [], "files": []}
    spec = tmp_path / "lab.toml"
    spec.write_text(_spec_text(lab_name))
    up = hvtools_cli("lab", "up", str(spec), "--json")
    assert up.returncode == 0, up.stderr
    report = json.loads(up.stdout)
    assert report["up"] and report["link"] == "veth" and not report["already_up"]
    assert [r["ok"] for r in report["reachability"]] == [True, True]
    assert sorted(_lab_traces(lab_name)["netns"]) == [f"hv-{lab_name}-h1", f"hv-{lab_name}-h2",
                                                      f"hv-{lab_name}-sw"]
    assert _root_links() == links_before  # the bridge and veths live in the lab's namespaces

    env = {"HVTOOLS_LAB": lab_name}
    st = json.loads(hvtools_cli("lab", "status", "--json", env=env).stdout)
    assert [(h["name"], h["agent"], h["address"]) for h in st["hosts"]] == [
        ("h1", "up", f"{SUBNET_BASE}.7.1"), ("h2", "up", f"{SUBNET_BASE}.7.2")]
    assert all(h["netns_exists"] and h["agent_pid"] for h in st["hosts"])

    again = hvtools_cli("lab", "up", str(spec), "--json")  # converges: nothing duplicated
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["already_up"]
    assert [h["agent_pid"] for h in json.loads(again.stdout)["hosts"]] == \
        [h["agent_pid"] for h in st["hosts"]]

    down = hvtools_cli("lab", "down", env=env)
    assert down.returncode == 0, down.stderr
    assert _lab_traces(lab_name) == before
    assert _root_links() == links_before
    twice = hvtools_cli("lab", "down", env=env)  # idempotent
    assert twice.returncode == 0 and "was not up" in twice.stdout


def test_agents_answer_over_unix_and_tcp_across_namespaces(lab: Lab) -> None:
    h1, h2 = lab.host("h1"), lab.host("h2")
    assert h1.call("ping")["host"] == "h1"
    st = h2.call("status")
    assert st["host"] == "h2" and st["netns_inode"] == netns_inode(h2.netns)
    assert {"ping", "status", "probe_peer"} <= set(st["methods"])
    # h1's agent calls h2's over TCP on the lab link...
    probe = h1.call("probe_peer", address=h2.address)
    assert probe["ok"] and probe["host"] == "h2"
    # ...and so does any process started in h1's namespace.
    code = ("import json; from hvtools.lab.hosts import rpc_tcp; "
            f"print(json.dumps(rpc_tcp({h2.address!r}, 'status')))")
    res = h1.run([sys.executable, "-c", code], check=True)
    assert json.loads(res.stdout)["host"] == "h2"
    # The root namespace is not on the lab link: no address or route of its subnet.
    assert f"{SUBNET_BASE}.7." not in subprocess.run(["ip", "-4", "addr"], capture_output=True,
                                                     text=True).stdout
    assert f"{SUBNET_BASE}.7.0/24" not in subprocess.run(["ip", "route"], capture_output=True,
                                                         text=True).stdout
    # A bad request is an error reply, and the agent keeps serving.
    with pytest.raises(HvError, match="unknown method"):
        h1.call("no_such_method")
    assert h1.call("ping")["host"] == "h1"


def test_crashed_agent_is_down_and_lab_down_cleans_up(lab: Lab, lab_name: str) -> None:
    h2 = lab.host("h2")
    pid = h2.agent_pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    while Path(f"/proc/{pid}").exists() and h2.agent_pid is not None:
        time.sleep(0.02)
    assert (h2.state_dir / "agent.sock").exists()  # a stale socket nobody answers on
    with pytest.raises(HostDownError):
        h2.call("ping", timeout=2.0)
    st = build.lab_status(lab_name)
    by = {h.name: h for h in st.hosts}
    assert by["h1"].agent_up and not by["h2"].agent_up
    assert by["h2"].detail == "agent process is gone"
    cli = hvtools_cli("lab", "status", env={"HVTOOLS_LAB": lab_name})
    assert "down" in cli.stdout
    build.lab_down(lab_name)
    assert _lab_traces(lab_name) == {"netns": [], "procs": [], "files": []}


def test_lab_up_restarts_a_crashed_agent(lab: Lab, lab_name: str, tmp_path: Path) -> None:
    h1 = lab.host("h1")
    old = h1.agent_pid
    assert old is not None
    os.kill(old, signal.SIGKILL)
    while h1.agent_pid is not None:
        time.sleep(0.02)
    spec = tmp_path / "lab.toml"  # written by the lab fixture
    res = hvtools_cli("lab", "up", str(spec), "--json")
    assert res.returncode == 0, res.stderr
    hosts = {h["name"]: h for h in json.loads(res.stdout)["hosts"]}
    assert hosts["h1"]["agent"] == "up" and hosts["h1"]["agent_pid"] not in (None, old)
    assert h1.call("ping")["host"] == "h1"


def test_failed_up_undoes_what_it_built(lab_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real = build._start_agent
    calls: list[str] = []

    def second_agent_fails(spec: Any, host: Any) -> int:
        calls.append(host.name)
        if host.name == "h2":
            raise LabError("injected: h2's agent did not start")
        return real(spec, host)

    monkeypatch.setattr(build, "_start_agent", second_agent_fails)
    with pytest.raises(LabError, match="injected"):
        build.lab_up(parse_lab_toml(_spec_text(lab_name, third=8)))
    assert calls == ["h1", "h2"]  # it got mid-way: h1's agent ran, the namespaces existed
    assert _lab_traces(lab_name) == {"netns": [], "procs": [], "files": []}


def test_rxe_falls_back_to_veth_with_the_reason(lab_name: str, tmp_path: Path) -> None:
    if build.probe_rxe() is None:
        pytest.skip("this kernel has soft-RoCE (rdma_rxe): there is no fallback to see")
    spec = tmp_path / "lab.toml"
    spec.write_text(_spec_text(lab_name, link="rxe", third=9))
    res = hvtools_cli("lab", "up", str(spec))
    assert res.returncode == 0, res.stderr
    assert "rxe:" in res.stderr and "falling back to veth" in res.stderr
    assert len([ln for ln in res.stderr.splitlines() if "rxe" in ln]) == 1
    st = json.loads(hvtools_cli("lab", "status", "--json", env={"HVTOOLS_LAB": lab_name}).stdout)
    assert st["requested_link"] == "rxe" and st["link"] == "veth"
    assert "rdma_rxe" in st["link_fallback"]


def test_vm_on_a_host_runs_in_its_namespace(lab: Lab, lab_name: str, image: Any) -> None:
    from hvtools.control.qemu_driver import QemuDriver

    drv = QemuDriver()
    vm = f"{RUN}-labvm"
    h2 = lab.host("h2")
    try:
        res = hvtools_cli("vm", "start", vm, "--memory", "256M", "--host", f"{lab_name}/h2")
        assert res.returncode == 0, res.stderr
        info = drv.info(vm)
        assert info.pid is not None and (info.host, info.lab) == ("h2", lab_name)
        assert os.stat(f"/proc/{info.pid}/ns/net").st_ino == netns_inode(h2.netns)
        ram = h2.memory_dir / f"{vm}.ram"
        assert ram.exists() and drv.ram_path(vm) == ram
        assert info.state_dir is not None
        assert json.loads((info.state_dir / "launch.json").read_text())["host"] == "h2"
        shown = json.loads(hvtools_cli("vm", "show", vm, "--json").stdout)
        assert (shown["host"], shown["lab"]) == ("h2", lab_name)
        listed = {v["name"]: v for v in json.loads(hvtools_cli("vm", "list", "--json").stdout)}
        assert listed[vm]["host"] == "h2"
        assert "h2" in hvtools_cli("vm", "list").stdout
        st = build.lab_status(lab_name)
        assert {h.name: h.vms for h in st.hosts} == {"h1": [], "h2": [vm]}
        assert drv.exec(vm, ["true"]).status == 0
        # lab down takes the VM with it: QEMU and its supervisor gone, RAM file gone.
        qemu_pid = info.pid
        build.lab_down(lab_name)
        assert not Path(f"/proc/{qemu_pid}").exists()
        assert not ram.exists()
        assert drv.info(vm).state.value == "defined"
        assert _lab_traces(lab_name) == {"netns": [], "procs": [], "files": []}
    finally:
        with contextlib.suppress(HvError):
            drv.kill(vm)
        with contextlib.suppress(HvError):
            drv.undefine(vm)


def test_bad_input_is_one_line_and_changes_nothing(lab: Lab, lab_name: str,
                                                   tmp_path: Path) -> None:
    vm = f"{RUN}-labbad"
    before = _lab_traces(lab_name)

    def vm_names() -> set[str]:
        return {v["name"] for v in json.loads(hvtools_cli("vm", "list", "--json").stdout)}

    def fails(*args: str, env: dict[str, str] | None = None) -> str:
        res = hvtools_cli(*args, env=env)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        return res.stderr

    assert "no host 'h9'" in fails("vm", "start", vm, "--memory", "256M",
                                   "--host", f"{lab_name}/h9")
    assert "not up" in fails("vm", "start", vm, "--memory", "256M", "--host",
                             f"{RUN}-nolab/h1")
    # A libvirt VM on a host needs that host's own libvirtd (a lab built with libvirt = true).
    assert "runs no libvirtd" in fails("vm", "start", vm, "--driver", "libvirt",
                                       "--host", f"{lab_name}/h1")
    bad = tmp_path / "bad.toml"
    bad.write_text(f'name = "{lab_name}x"\nlnk = "veth"\n')
    assert "lnk: unknown key" in fails("lab", "up", str(bad))
    bad.write_text(f'name = "{lab_name}x"\n[[host]]\nname = "h1"\naddress = "10.1.2.3"\n'
                   f'frobs = 1\n')
    assert "host #1 frobs: unknown key" in fails("lab", "up", str(bad))
    bad.write_text(f'name = "{lab_name}x"\n[[host]]\nname = "h1"\naddress = "192.0.2.1"\n')
    assert "host #1 address" in fails("lab", "up", str(bad))
    other = tmp_path / "other.toml"  # the lab's own name, other hosts
    other.write_text(_spec_text(lab_name, third=10))
    assert "different spec" in fails("lab", "up", str(other))
    assert "cannot read lab spec" in fails("lab", "up", str(tmp_path / "missing.toml"))
    bad.write_text("name = \n")
    assert "not valid TOML" in fails("lab", "up", str(bad))
    assert _lab_traces(lab_name) == before and vm not in vm_names()
    assert _lab_traces(f"{lab_name}x") == {"netns": [], "procs": [], "files": []}

    # A host whose agent is down: the VM is not created either.
    h1 = lab.host("h1")
    pid = h1.agent_pid
    assert pid is not None, (h1.state_dir / "agent.log").read_text()[-2000:]
    os.kill(pid, signal.SIGKILL)
    while h1.agent_pid is not None:
        time.sleep(0.02)
    assert "down" in fails("vm", "start", vm, "--memory", "256M", "--host", f"{lab_name}/h1")
    with pytest.raises(UnknownHostError):
        lab.host("h9")
    with pytest.raises(HostDownError):
        rpc_unix(host_dir(lab_name, "h1") / "agent.sock", "ping", timeout=2.0)
    assert netns_path(h1.netns).exists()


def test_per_host_libvirtd_in_its_own_namespaces(lab_name: str, tmp_path: Path) -> None:
    import re

    from hvtools.lab import libvirtd
    from hvtools.libvirt.daemon import connect

    spec = tmp_path / "lab.toml"
    spec.write_text(_spec_text(lab_name, third=11, libvirt=True))
    res = hvtools_cli("lab", "up", str(spec), "--json")
    assert res.returncode == 0, res.stderr
    st = json.loads(res.stdout)
    assert [h["libvirt_up"] for h in st["hosts"]] == [True, True]
    lab = load_lab(lab_name)
    uuids, pids = [], []
    for h in lab.hosts:
        assert h.libvirt_uri == f"qemu+unix:///system?socket={h.state_dir}/run/libvirt/libvirt-sock"
        conn = connect(h.libvirt_uri)
        try:
            caps = conn.getCapabilities()
        finally:
            conn.close()
        m = re.search(r"<host>\s*<uuid>([0-9a-f-]+)</uuid>", caps)
        assert m is not None
        uuids.append(m.group(1))
        pid = int((h.state_dir / "run/libvirt/libvirtd.pid").read_text())
        pids.append(pid)
        assert os.stat(f"/proc/{pid}/ns/net").st_ino == netns_inode(h.netns)
        assert os.stat(f"/proc/{pid}/ns/mnt").st_ino != os.stat("/proc/self/ns/mnt").st_ino
        assert libvirtd.host_libvirt_up(h)
    assert len(set(uuids)) == 2  # distinct host UUIDs, as two machines have
    # The bind mounts stay inside the daemons' mount namespaces.
    assert str(lab_dir(lab_name)) not in Path("/proc/self/mountinfo").read_text()
    build.lab_down(lab_name)
    assert not any(pid_alive(pid) for pid in pids)  # (a zombie awaiting init counts as gone)
    assert _lab_traces(lab_name) == {"netns": [], "procs": [], "files": []}
