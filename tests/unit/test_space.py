"""Space accounting, the state line and the cull policies (pure)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from cachefilesd_py.frontends.classic.commands import parse_state
from cachefilesd_py.space.policy import POLICIES, FifoPolicy, LruPolicy, S3FifoPolicy
from cachefilesd_py.space.stats import Limits, SpaceSnapshot, bytes_to_free, cull_needed


def test_state_line_from_the_real_kernel() -> None:
    s = parse_state(
        b"cull=0 frun=237 fcull=195 fstop=51 brun=1e3c bcull=1428 bstop=a14 freleased=0 breleased=0"
    )
    assert not s.cull and s.get("brun") == 0x1E3C and s.get("fstop") == 0x51
    old = parse_state(b"cull=1 frun=1 fcull=1 fstop=1 brun=1 bcull=1 bstop=1")
    assert old.cull and old.get("freleased") == 0
    bad = parse_state(b"cull=1 junk brun=zz")
    assert bad.cull and bad.malformed == ("junk", "brun=zz")


@given(st.binary(max_size=200))
def test_state_line_garbage_never_raises(line: bytes) -> None:
    parse_state(line)


def test_thresholds_and_hysteresis() -> None:
    snap = SpaceSnapshot(4096, 100_000, 6_000, 10_000, 9_000)
    lim = Limits.from_percent(
        snap, {"brun": 10, "bcull": 7, "bstop": 3, "frun": 10, "fcull": 7, "fstop": 3}
    )
    assert lim.bcull == 7_000 and lim.frun == 1_000
    assert cull_needed(snap, lim, culling=False)
    mid = SpaceSnapshot(4096, 100_000, 8_000, 10_000, 9_000)
    assert not cull_needed(mid, lim, culling=False)
    assert cull_needed(mid, lim, culling=True)
    assert bytes_to_free(snap, lim) == (10_000 + 2_000 - 6_000) * 4096


def drain(policy, n: int, exempt=lambda k: False) -> list:  # type: ignore[no-untyped-def]
    out = []
    for key in policy.victims(exempt):
        out.append(key)
        policy.remove(key)
        if len(out) == n:
            break
    return out


def test_fifo_and_lru_orders() -> None:
    for cls, expected in ((FifoPolicy, ["a", "b"]), (LruPolicy, ["b", "c"])):
        p = cls()
        for k in "abc":
            p.admit(k, 1)
        p.touch("a")
        assert drain(p, 2) == expected


def test_s3fifo_evicts_one_hit_wonders_before_reused_objects() -> None:
    p = S3FifoPolicy()
    for k in range(20):
        p.admit(("hot", k), 1)
        p.touch(("hot", k))
    for k in range(100):
        p.admit(("scan", k), 1)
    victims = drain(p, 80)
    assert len(victims) == 80 and all(v[0] == "scan" for v in victims)


@given(
    st.sampled_from(sorted(POLICIES)),
    st.lists(
        st.tuples(st.sampled_from(["admit", "touch", "remove"]), st.integers(0, 30)), max_size=200
    ),
    st.sets(st.integers(0, 30)),
)
def test_policies_never_evict_pinned_keys_and_name_each_victim_once(name, ops, pinned) -> None:  # type: ignore[no-untyped-def]
    p = POLICIES[name]()
    live: set[int] = set()
    for op, key in ops:
        if op == "admit":
            p.admit(key, 1)
            live.add(key)
        elif op == "touch":
            p.touch(key)
        else:
            p.remove(key)
            live.discard(key)
    victims = drain(p, 1000, exempt=lambda k: k in pinned)
    assert len(victims) == len(set(victims))
    assert not set(victims) & pinned
    assert set(victims) == live - pinned


def test_caps_table() -> None:
    from cachefilesd_py.config.model import SizeRule
    from cachefilesd_py.space.caps import Caps, volume_name

    assert volume_name("Ierofs,imgs") == "imgs" and volume_name("Infs,4.2") == "nfs,4.2"
    caps = Caps(
        max_bytes=1000,
        max_objects=10,
        volume_rules=(SizeRule("img*", 300), SizeRule("*", 10_000)),
    )
    n = caps.needs(1500, 12, {"Ierofs,imgA": 400, "Ierofs,other": 900, "Infs,x": 200})
    assert (n.bytes, n.objects, n.volumes) == (500, 2, {"Ierofs,imgA": 100})
    assert n.any
    assert not Caps().configured and not Caps().needs(10**15, 10**9, {"Ix": 10**15}).any
    # first matching rule wins, even when a later one is tighter
    assert Caps(volume_rules=(SizeRule("*", 10), SizeRule("a", 1))).volume_cap("Ierofs,a") == 10


@given(
    st.lists(
        st.tuples(st.booleans(), st.sampled_from(["D1", "D12", "D2", "S1", "T\u00e9", "Dx", "D"])),
        max_size=60,
    )
)
def test_packed_names_behave_as_a_set(ops: list[tuple[bool, str]]) -> None:
    from cachefilesd_py.space.tree_index import PackedNames

    packed, model = PackedNames(), set()
    for add, name in ops:
        if add:
            packed.add(name)
            model.add(name)
        else:
            packed.discard(name)
            model.discard(name)
        assert sorted(packed) == sorted(model) and len(packed) == len(model)
        assert all((n in packed) == (n in model) for n in ("D1", "D12", "D", "Dx"))
