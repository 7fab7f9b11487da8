"""Test tiers: ``tests/unit`` (pure), ``tests/integration`` (loopback servers, real
files, the fake kernel), ``tests/vm`` (marker ``guest``: a real kernel in QEMU).

Guest tests run only where ``CACHEFILESD_GUEST=1`` (set by ``scripts/vmtest`` inside
the VM). ``scripts/test`` deselects them on the host with ``-m "not guest"``; this hook
is the safety net for a bare ``pytest`` on the host.

Inside the guest, a test marked with a kernel feature (``ondemand``: cachefiles
on-demand mode, the 6.12 test kernel; ``fanotify``: pre-content events and file-backed
EROFS, the 7.3 test kernel) is skipped, with the kernel's own answer as the reason,
when the running kernel lacks it (``tests/vm/kernel_features.py`` asks the kernel).
Unmarked guest tests need only classic mode and run on both.
"""

from __future__ import annotations

import os
from functools import cache
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.vm.kernel_features import KernelFeatures

IN_GUEST = os.environ.get("CACHEFILESD_GUEST") == "1"
#: guest markers naming a kernel feature (see tests/vm/kernel_features.py)
KERNEL_FEATURE_MARKERS = ("ondemand", "fanotify")


@cache
def kernel_features() -> KernelFeatures:
    from tests.vm.kernel_features import probe

    return probe()


def pytest_report_header(config: pytest.Config) -> str | None:
    if not IN_GUEST:
        return None
    k = kernel_features()
    parts = [
        f"{name}: {'yes' if k.missing(name) is None else 'no, ' + str(k.missing(name))}"
        for name in KERNEL_FEATURE_MARKERS
    ]
    return f"guest kernel {k.release}; " + "; ".join(parts)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not IN_GUEST:
        outside = pytest.mark.skip(reason="guest tier: needs the test kernel (scripts/vmtest)")
        for item in items:
            if "guest" in item.keywords:
                item.add_marker(outside)
        return
    if not any(item.get_closest_marker(m) for item in items for m in KERNEL_FEATURE_MARKERS):
        return
    k = kernel_features()
    for item in items:
        for marker in KERNEL_FEATURE_MARKERS:
            why = k.missing(marker) if item.get_closest_marker(marker) else None
            if why is not None:
                item.add_marker(
                    pytest.mark.skip(reason=f"needs `{marker}`; kernel {k.release}: {why}")
                )
                break
