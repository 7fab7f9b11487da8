"""Test tiers: ``tests/unit`` (pure), ``tests/integration`` (loopback servers, real
files, the fake kernel), ``tests/vm`` (marker ``guest``: a real kernel in QEMU).

Guest tests run only where ``CACHEFILESD_GUEST=1`` (set by ``scripts/vmtest`` inside
the VM). ``scripts/test`` deselects them on the host with ``-m "not guest"``; this hook
is the safety net for a bare ``pytest`` on the host.
"""

from __future__ import annotations

import os

import pytest

IN_GUEST = os.environ.get("CACHEFILESD_GUEST") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IN_GUEST:
        return
    outside = pytest.mark.skip(reason="guest tier: needs the test kernel (scripts/vmtest)")
    for item in items:
        if "guest" in item.keywords:
            item.add_marker(outside)
