"""Linux capabilities of this process: read them, and drop all but a few for good.

What cachefiles checks (fs/cachefiles, 6.12): only ``open("/dev/cachefiles")`` tests a
capability (``CAP_SYS_ADMIN``, in ``cachefiles_daemon_open``). Every later command
(``dir`` … ``bind``, ``copen``, ``cull``, ``inuse``, ``restore``) and the READ_COMPLETE
ioctl need only the open fd. ``bind`` copies the binding process's credentials
(``prepare_kernel_cred(current)``) and the kernel does all its own cache-file work
(lookups, tmpfiles, culls into the graveyard) under that copy, so what the daemon keeps
*after* binding does not change what the kernel may do.

Dropping means: the ambient set cleared, the bounding set reduced (possible only while
``CAP_SETPCAP`` is effective; under systemd ``CapabilityBoundingSet=`` already did it),
then effective, permitted and inheritable set to the kept ones, and no-new-privileges
set, so not even an ``execve`` of a set-uid file could bring them back. ``capset``
acts on the calling thread: call this while the process has one thread.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from pathlib import Path

from cachefilesd_py.kernel import _sys

NAMES: dict[int, str] = {
    0: "CAP_CHOWN",
    1: "CAP_DAC_OVERRIDE",
    2: "CAP_DAC_READ_SEARCH",
    3: "CAP_FOWNER",
    4: "CAP_FSETID",
    5: "CAP_KILL",
    6: "CAP_SETGID",
    7: "CAP_SETUID",
    8: "CAP_SETPCAP",
    9: "CAP_LINUX_IMMUTABLE",
    10: "CAP_NET_BIND_SERVICE",
    11: "CAP_NET_BROADCAST",
    12: "CAP_NET_ADMIN",
    13: "CAP_NET_RAW",
    14: "CAP_IPC_LOCK",
    15: "CAP_IPC_OWNER",
    16: "CAP_SYS_MODULE",
    17: "CAP_SYS_RAWIO",
    18: "CAP_SYS_CHROOT",
    19: "CAP_SYS_PTRACE",
    20: "CAP_SYS_PACCT",
    21: "CAP_SYS_ADMIN",
    22: "CAP_SYS_BOOT",
    23: "CAP_SYS_NICE",
    24: "CAP_SYS_RESOURCE",
    25: "CAP_SYS_TIME",
    26: "CAP_SYS_TTY_CONFIG",
    27: "CAP_MKNOD",
    28: "CAP_LEASE",
    29: "CAP_AUDIT_WRITE",
    30: "CAP_AUDIT_CONTROL",
    31: "CAP_SETFCAP",
    32: "CAP_MAC_OVERRIDE",
    33: "CAP_MAC_ADMIN",
    34: "CAP_SYSLOG",
    35: "CAP_WAKE_ALARM",
    36: "CAP_BLOCK_SUSPEND",
    37: "CAP_AUDIT_READ",
    38: "CAP_PERFMON",
    39: "CAP_BPF",
    40: "CAP_CHECKPOINT_RESTORE",
}
BY_NAME = {name: number for number, name in NAMES.items()}
CAP_SYS_ADMIN = BY_NAME["CAP_SYS_ADMIN"]
CAP_SETPCAP = BY_NAME["CAP_SETPCAP"]


def names(mask: int) -> list[str]:
    return [NAMES.get(n, f"cap{n}") for n in range(64) if mask >> n & 1]


def mask_of(caps: list[str] | tuple[str, ...]) -> int:
    mask = 0
    for name in caps:
        mask |= 1 << BY_NAME[name]
    return mask


def last_cap() -> int:
    try:
        return int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        return max(NAMES)


@dataclass(frozen=True)
class CapState:
    effective: int
    permitted: int
    inheritable: int

    @classmethod
    def now(cls) -> CapState:
        return cls(*_sys.capget())

    def describe(self) -> dict[str, list[str]]:
        return {"effective": names(self.effective), "permitted": names(self.permitted)}


@dataclass(frozen=True)
class DropResult:
    before: CapState
    after: CapState
    #: whether the bounding set could be reduced (needs CAP_SETPCAP)
    bounding_reduced: bool


def drop_all_but(keep: int = 0) -> DropResult:
    """Keep only the capabilities in ``keep`` (a mask), for good. See the module doc."""
    before = CapState.now()
    keep &= before.permitted
    try:
        _sys.prctl(_sys.PR_CAP_AMBIENT, _sys.PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # kernels before 4.3 have no ambient set
            raise
    bounding = bool(before.effective >> CAP_SETPCAP & 1)
    if bounding:
        for cap in range(last_cap() + 1):
            if not keep >> cap & 1 and _sys.prctl(_sys.PR_CAPBSET_READ, cap) == 1:
                _sys.prctl(_sys.PR_CAPBSET_DROP, cap)
    _sys.capset(keep, keep, 0)
    _sys.prctl(_sys.PR_SET_NO_NEW_PRIVS, 1)
    return DropResult(before, CapState.now(), bounding)
