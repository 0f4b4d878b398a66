"""hvtools: a QEMU/KVM lab toolkit for memory- and I/O-virtualization work."""

__version__ = "0.1.0"
