"""The pure parts of the live-migration engine: QEMU's statuses and MigrationStats arithmetic."""

from __future__ import annotations

import pytest

from hvtools.errors import UsageError
from hvtools.migration import live


def test_statuses_mirror_qemu_and_know_which_are_final() -> None:
    assert live.MigrationStatus("postcopy-active") is live.MigrationStatus.POSTCOPY_ACTIVE
    final = {s.value for s in live.MigrationStatus if s.finished}
    assert final == {"completed", "failed", "cancelled"}
    with pytest.raises(ValueError):
        live.MigrationStatus("bogus")


def test_pages_resent_counts_what_went_beyond_one_pass() -> None:
    # 512 MiB guest: 131072 pages; 120000 zero + 11200 normal = 131200 sent: 128 re-sent.
    ram = {"total": 512 << 20, "page-size": 4096, "normal": 11200, "zero-pages": 120000}
    assert live.pages_resent(ram) == (131200, 128)
    # Older QEMUs call zero pages "duplicate"; a first pass still running re-sent nothing.
    assert live.pages_resent({"total": 1 << 20, "duplicate": 10, "normal": 5}) == (15, 0)


def test_progress_sample_from_query_migrate() -> None:
    p = live._progress({"status": "active", "expected-downtime": 42, "ram": {
        "transferred": 1000, "remaining": 24, "total": 1024, "dirty-pages-rate": 3,
        "page-size": 4096, "mbps": 800.5, "dirty-sync-count": 2}})
    assert (p.status, p.transferred, p.remaining, p.total) == ("active", 1000, 24, 1024)
    assert p.dirty_rate == 3 * 4096 and p.expected_downtime_ms == 42 and p.iteration == 2
    assert live._progress({"status": "setup"}).transferred == 0


@pytest.mark.parametrize(("text", "value"), [("500M", 500 << 20), ("2G", 2 << 30),
                                             ("64k", 64 << 10), ("1000", 1000),
                                             ("1.5G/s", 3 << 29)])
def test_bandwidth_rates(text: str, value: int) -> None:
    assert live.parse_rate(text) == value


@pytest.mark.parametrize("text", ["fast", "-5M", "0"])
def test_bad_bandwidth_is_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError):
        live.parse_rate(text)
