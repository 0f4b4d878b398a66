"""Adapters to libvirt: the domain XML a spec renders to, and the libvirtd it runs under."""
