"""Where hvtools keeps its state: ``$HVTOOLS_HOME`` (default ``/var/lib/hvtools``)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_HOME = Path("/var/lib/hvtools")


def home() -> Path:
    """The hvtools home directory (images, VM state dirs, caches)."""
    return Path(os.environ.get("HVTOOLS_HOME", str(DEFAULT_HOME)))


def images_dir() -> Path:
    """Cache of built guest images, one subdirectory per input key."""
    return home() / "images"


def vms_dir() -> Path:
    """One state directory per VM of the qemu driver."""
    return home() / "vms"


def cache_dir() -> Path:
    """Downloaded packages and probe results."""
    return home() / "cache"
