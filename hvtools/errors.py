"""The hvtools error tree.

Hardware outcomes (faults, violations) are values, never exceptions. Exceptions are for misuse
and for failures of real things. Every one derives from :class:`HvError`::

    HvError
     +-- UsageError            bad input from the user; nothing was changed (exit status 2)
     |    +-- SpecError        a VM spec that does not validate
     |    +-- NameInUseError   a VM name that already exists
     |    +-- UnknownVmError   a VM name that does not exist
     |    +-- UnknownHostError a lab host (or lab) that does not exist
     +-- StateError            an operation called in a state that does not allow it
     |    +-- HostDownError    a lab host whose agent does not answer
     +-- DependencyError       a binary, package or service that is missing or too old
     |    +-- NoRdmaDeviceError the verbs backend needs an RDMA device and there is none
     +-- ImageError            building or finding the guest image failed
     +-- VmError               a real VM misbehaved
     |    +-- VmLaunchFailure  QEMU / libvirt did not start the guest (carries command, log)
     |    +-- VmCrashed        the VM's QEMU died under us (carries the last log lines)
     |    +-- QmpError         a QMP command failed (carries the command and the reply)
     +-- AgentError            the guest agent did not answer or broke the protocol
     +-- HvTimeout             a bounded wait ran out
     +-- LabError              building, probing or tearing down a lab failed
     +-- RemoteCallError       a host agent's method raised (carries host, method, type)
     +-- TransportError        a one-sided transfer failed (rejected by the target, peer gone)
     +-- MigrationError        a migration or recovery failed; the source is intact
     |    +-- MigrationRefused a migration that cannot start (also a UsageError)
     |    +-- SplitMigration   failed past the switch-over: both sides kept paused
     |    +-- VerifyFailed     guest pages differ after a migration (--verify)
     +-- VhostError            a vhost-user peer broke the protocol (the backend refuses it)

A wrapping error keeps its cause (``raise ... from err``). ``KeyboardInterrupt`` and
``asyncio.CancelledError`` are never wrapped.
"""

from __future__ import annotations

from collections.abc import Sequence


class HvError(Exception):
    """Root of every error hvtools raises on purpose."""

    #: Exit status the CLI uses for this class of error.
    exit_status: int = 1


class UsageError(HvError):
    """Bad input from the user. Raised before anything is changed."""

    exit_status = 2


class SpecError(UsageError):
    """A VM spec (TOML or flags) that does not validate. ``field`` names the offending key."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NameInUseError(UsageError):
    """A VM of that name already exists."""


class UnknownVmError(UsageError):
    """No VM of that name exists."""


class StateError(HvError):
    """An operation called in a state that does not allow it; the message names the state needed."""

    exit_status = 2


class DependencyError(HvError):
    """A required binary, package or service is missing or too old."""

    exit_status = 2


class ImageError(HvError):
    """Building or locating the guest image failed."""


class VmError(HvError):
    """A real VM misbehaved."""


class VmLaunchFailure(VmError):
    """The guest did not start. Carries the command line, exit code and the last log lines."""

    def __init__(
        self,
        message: str,
        *,
        command: Sequence[str] = (),
        exit_code: int | None = None,
        log_tail: Sequence[str] = (),
    ) -> None:
        super().__init__(message)
        self.command = list(command)
        self.exit_code = exit_code
        self.log_tail = list(log_tail)


class VmCrashed(VmError):
    """The VM's hypervisor process died. Carries the last lines of its log."""

    def __init__(self, name: str, log_tail: Sequence[str] = ()) -> None:
        last = log_tail[-1] if log_tail else "no log output"
        super().__init__(f"VM {name!r} crashed: {last}")
        self.name = name
        self.log_tail = list(log_tail)


class QmpError(VmError):
    """A QMP command failed. Carries the command sent and the error reply."""

    def __init__(self, command: str, reply: object, message: str | None = None) -> None:
        super().__init__(message or f"QMP {command} failed: {reply}")
        self.command = command
        self.reply = reply


class AgentError(HvError):
    """The guest agent did not answer, or answered outside the protocol."""


class HvTimeout(HvError):
    """A bounded wait ran out."""


# -- lab hosts (hvtools.lab) ------------------------------------------------------------------
class LabError(HvError):
    """Building, probing or tearing down a lab (namespaces, links, host agents) failed."""


class UnknownHostError(UsageError):
    """No lab host of that name (or no lab of that name)."""


class HostDownError(StateError):
    """A lab host's agent does not answer (crashed, killed, or the lab is down)."""


class RemoteCallError(HvError):
    """A host agent's method raised. Carries the remote error's type name and message."""

    def __init__(self, host: str, method: str, err_type: str, message: str) -> None:
        super().__init__(f"{host}: {method} failed: {err_type}: {message}")
        self.host = host
        self.method = method
        self.err_type = err_type
        self.remote_message = message


# -- migration and recovery (hvtools.migration) -----------------------------------------------
class MigrationError(HvError):
    """A migration or recovery failed. The source VM (or the frozen host's memory) is intact."""


class MigrationRefused(MigrationError, UsageError):
    """A migration that cannot start: bad target, missing features, not enough memory."""


class TransportError(HvError):
    """The one-sided transport failed: a rejected or failed remote op, a peer gone, a link cut."""


class NoRdmaDeviceError(DependencyError):
    """The verbs backend needs an RDMA device (an HCA, RoCE NIC, rxe or siw) and there is none."""


# -- vhost-user device backends (hvtools.vhost) -----------------------------------------------
class VhostError(HvError):
    """A vhost-user peer broke the protocol (vhost-user.rst): a malformed or unexpected message,
    a bad fd count, a memory table or log the backend cannot map. The backend refuses the
    message and drops that connection; it never crashes."""
