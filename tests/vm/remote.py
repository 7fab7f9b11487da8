"""nginx in another network namespace, behind a veth pair (guest tier): the rig for
disconnected operation. The daemon (and the test) stay in the guest's own namespace
with the client end of the pair; nginx serves a folder from the server namespace on
``http://<server address>:80``. The link can be cut at either end:

- ``link(up=False)``: ``ip link set <client end> down`` (the guest's own interface);
- ``peer(up=False)``: the server end goes down, the client end loses its carrier.

``change_blob`` replaces a blob upstream atomically (write aside, rename), so nginx
serves a new length/ETag from the next request on: an upstream change during an
outage, for the conflict tests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cachefilesd_py.testing.netns import VethPair
from tests.vm.rig import Nginx, start_nginx


@dataclass
class RemoteNginx:
    net: VethPair
    nginx: Nginx
    root: Path

    @property
    def url(self) -> str:
        return self.nginx.url

    @property
    def host(self) -> str:
        return self.net.server_addr

    def link(self, *, up: bool) -> None:
        self.net.client_link(up=up)
        if up:
            self.net.wait_reachable()

    def peer(self, *, up: bool) -> None:
        self.net.server_link(up=up)
        if up:
            self.net.wait_reachable()

    def change_blob(self, name: str, data: bytes) -> None:
        path = self.root / name
        tmp = path.with_name(f".{name}.new")
        tmp.write_bytes(data)
        os.utime(tmp)  # a new mtime: nginx's ETag is mtime-size
        tmp.replace(path)

    def stop(self) -> None:
        self.nginx.proc.terminate()
        self.nginx.proc.wait(10)
        self.net.destroy()


def start_remote_nginx(root: Path, workdir: Path, bearer: str | None = None) -> RemoteNginx:
    net = VethPair.create("cfr", client_in_current=True)
    try:
        nginx = start_nginx(
            root,
            workdir,
            listen=net.server_addr,
            port=80,
            argv_prefix=tuple(net.argv_in(net.server_ns)),
            bearer=bearer,
        )
    except BaseException:
        net.destroy()
        raise
    return RemoteNginx(net, nginx, root)
