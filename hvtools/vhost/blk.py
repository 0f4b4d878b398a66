"""``python -m hvtools.vhost.blk --socket SOCK --disk FILE --control CTRL [--no-dirty-log]``

Serve FILE as a vhost-user-blk device on SOCK (QEMU connects as the client, e.g.
``-chardev socket,id=vub0,path=SOCK,reconnect-ms=1000 -device
vhost-user-blk-pci,chardev=vub0,num-queues=1``), with the control channel on CTRL (JSON lines:
``status``, ``harvest``, ``set_dirty_log``). Runs until SIGTERM/SIGINT; outlives front-ends.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from types import FrameType

from hvtools.errors import HvError
from hvtools.vhost.server import BlkBackend, Server


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hvtools.vhost.blk", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--socket", required=True, type=Path, help="vhost-user socket to listen on")
    ap.add_argument("--disk", required=True, type=Path, help="raw disk image to serve")
    ap.add_argument("--control", required=True, type=Path, help="control socket (JSON lines)")
    ap.add_argument("--no-dirty-log", action="store_true",
                    help="start with the shared vhost log disabled (debug: migration loses "
                         "the device's writes)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s vhost-user-blk %(levelname)s %(message)s")
    try:
        backend = BlkBackend(args.disk, dirty_log=not args.no_dirty_log)
        server = Server(backend, args.socket, args.control)
    except (OSError, HvError) as err:
        logging.error("cannot start: %s", err)
        return 1

    def stop(signum: int, frame: FrameType | None) -> None:
        server.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    logging.info("serving %s (%d bytes) on %s, control %s, shared dirty log %s", args.disk,
                 backend.disk_size, args.socket, args.control,
                 "off" if args.no_dirty_log else "on")
    try:
        server.serve()
    finally:
        server.close()
        args.socket.unlink(missing_ok=True)
        args.control.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
