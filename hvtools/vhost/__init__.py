"""vhost-user device backends written with hvtools (issue 6).

- :mod:`hvtools.vhost.protocol` — vhost-user messages as values (pure).
- :mod:`hvtools.vhost.virtq` — split virtqueue descriptor walker and virtio-blk requests (pure).
- :mod:`hvtools.vhost.dirty` — the backend's own per-region dirty bitmaps and the shared
  vhost log (VHOST_F_LOG_ALL), both set with atomic 64-bit ORs.
- :mod:`hvtools.vhost.server` — the vhost-user-blk backend: socket, rings, control channel.
- ``python -m hvtools.vhost.blk`` — its command line.
"""
