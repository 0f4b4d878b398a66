"""Adapters to QEMU itself: the binary, its command line, QMP, and its processes."""
