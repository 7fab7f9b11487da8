"""The fanotify pre-content frontend (Linux 6.14+): EROFS mounts a sparse cache file,
the daemon fills missing ranges when the kernel reports an access
(docs/protocol-fanotify.md). So far only the pure wire codec (``wire.py``)."""
