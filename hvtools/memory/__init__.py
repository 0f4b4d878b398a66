"""Guest memory: one read protocol over a live RAM file, a dump, or a buffer."""
