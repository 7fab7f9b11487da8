"""The kernel contract cases (cachefilesd_py/testing/kernel_contract.py) against the
fake: the guest tier runs the very same cases on the real 6.12 kernel
(tests/vm/test_kernel_contract_guest.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from cachefilesd_py.testing.fake_kernel import FakeHarness
from cachefilesd_py.testing.kernel_contract import (
    CASES,
    KernelHarness,
    case_read_complete_needs_the_objects_fd,
)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_contract_on_fake(case: Callable[[KernelHarness], None], tmp_path: Path) -> None:
    h = FakeHarness(tmp_path)
    try:
        case(h)
        assert h.device.open_anon_fds() == [], "the case left anonymous fds open"
    finally:
        h.close()


def test_cases_share_one_cache(tmp_path: Path) -> None:
    """Each case uses its own fsids, so all of them run one after another on one
    bound cache (as a guest run may do)."""
    h = FakeHarness(tmp_path)
    try:
        for case in CASES:
            case(h)
        assert h.device.open_anon_fds() == []
    finally:
        h.close()


def test_the_contract_tells_kernels_apart(tmp_path: Path) -> None:
    """The cases can fail: a 6.9 kernel completes a READ through any anon fd, and the
    6.10 case says so."""
    h = FakeHarness(tmp_path, version=(6, 9))
    try:
        with pytest.raises(AssertionError, match="another object's fd succeeded"):
            case_read_complete_needs_the_objects_fd(h)
    finally:
        h.close()
