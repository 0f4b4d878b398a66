"""One-sided transport throughput and latency beside a raw TCP stream, in one run.

READ and WRITE throughput (MiB/s, ``--depth`` ops outstanding) and single-op latency (median
us) for 4 KiB ... 4 MiB ops, next to a plain TCP socket stream between the same two processes
over the same link; every figure the median of ``--reps`` runs. By default the target runs in
one network namespace and the initiator in another, joined by a veth pair made and removed
here (``--local``: loopback). Target (issue 4): READ at >= 1 MiB ops >= 70% of raw TCP.

    python bench/transport.py [--provider tcp] [--local] [--reps 5] [--json]

This is ``hvtools bench transport``; both call hvtools.transport.bench.run_bench.
"""

from __future__ import annotations

import sys

from hvtools.cli.main import run

if __name__ == "__main__":
    run(["bench", "transport", *sys.argv[1:]])
