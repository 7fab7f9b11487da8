"""The shared cull plan (space/plan.py) and the loop that carries it out
(space/culler.py): tables of candidates and needs -> decisions and outcomes."""

from __future__ import annotations

import errno

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from cachefilesd_py.space.culler import EventBudget, run_plan
from cachefilesd_py.space.plan import Action, CullPlan, Needs, Outcome, Tally
from cachefilesd_py.space.scan import Candidate

MB = 1 << 20


def cand(name: str, mb: float, volume: str = "Ierofs,v", atime: int = 0) -> Candidate:
    return Candidate(atime, int(mb * MB) // 512, f"/c/cache/{volume}/@00", name)


def volume_of(c: Candidate) -> str:
    return c.directory.split("/")[3]


class Remover:
    """Culls succeed unless the name is in ``busy``; trims free half of what is asked."""

    def __init__(self, busy: frozenset[str] = frozenset(), untrimmable: bool = False) -> None:
        self.busy = busy
        self.untrimmable = untrimmable
        self.done: list[tuple[str, str]] = []

    def cull(self, c: Candidate) -> Outcome:
        self.done.append(("cull", c.name))
        return Outcome.BUSY if c.name in self.busy else Outcome.CULLED

    def trim(self, c: Candidate, nbytes: int) -> tuple[Outcome, int]:
        self.done.append(("trim", c.name))
        if self.untrimmable:
            return Outcome.UNTRIMMABLE, 0
        return Outcome.TRIMMED, nbytes


def decisions(plan: CullPlan, cands: list[Candidate], remover: Remover) -> list[tuple[str, str]]:
    """Run the plan by hand: (name, action or skip outcome) per candidate, until stop."""
    out = []
    for c in cands:
        d = plan.decide(c)
        if d.action is Action.STOP:
            out.append((c.name, "stop"))
            break
        if d.action is Action.SKIP:
            assert d.outcome is not None
            out.append((c.name, d.outcome.value))
            plan.record(c, d.outcome)
            continue
        out.append((c.name, d.action.value))
        if d.action is Action.TRIM:
            outcome, freed = remover.trim(c, d.trim_bytes)
        else:
            outcome = remover.cull(c)
            freed = c.blocks * 512 if outcome is Outcome.CULLED else 0
        plan.record(c, outcome, freed)
    return out


@pytest.mark.parametrize(
    ("needs", "cands", "busy", "expected"),
    [
        pytest.param(
            Needs(bytes=3 * MB),
            [cand("a", 1), cand("b", 1), cand("c", 1), cand("d", 1)],
            (),
            [("a", "cull"), ("b", "cull"), ("c", "cull"), ("d", "stop")],
            id="bytes: the first ones until enough is freed",
        ),
        pytest.param(
            Needs(bytes=2 * MB),
            [cand("a", 1), cand("b", 1), cand("c", 1), cand("d", 1)],
            ("a",),
            [("a", "cull"), ("b", "cull"), ("c", "cull"), ("d", "stop")],
            id="a busy object frees nothing: the next goes",
        ),
        pytest.param(
            Needs(objects=2),
            [cand("a", 0.1), cand("pin-b", 0.1), cand("use-c", 0.1), cand("d", 0.1), cand("e", 1)],
            (),
            [("a", "cull"), ("pin-b", "pinned"), ("use-c", "in_use"), ("d", "cull"), ("e", "stop")],
            id="objects; pinned and in-use objects are skipped",
        ),
        pytest.param(
            Needs(volumes={"Ierofs,big": 2 * MB}),
            [
                cand("x", 1, "Ierofs,small"),
                cand("y", 1, "Ierofs,big"),
                cand("z", 1, "Ierofs,big"),
                cand("w", 1, "Ierofs,big"),
            ],
            (),
            [("x", "not_needed"), ("y", "cull"), ("z", "cull"), ("w", "stop")],
            id="a volume over its cap: only its objects go",
        ),
        pytest.param(
            Needs(bytes=1 * MB, volumes={"Ierofs,big": 1 * MB}),
            [
                cand("x", 1, "Ierofs,small"),
                cand("y", 1, "Ierofs,small"),
                cand("z", 1, "Ierofs,big"),
            ],
            (),
            [("x", "cull"), ("y", "not_needed"), ("z", "cull")],
            id="the cache-wide need first, then the volume's",
        ),
        pytest.param(
            Needs(bytes=1 * MB),
            [cand("huge", 100), cand("b", 1)],
            (),
            [("huge", "trim"), ("b", "stop")],
            id="much larger than needed: trimmed",
        ),
        pytest.param(
            Needs(bytes=1 * MB, objects=1),
            [cand("huge", 100), cand("b", 1)],
            (),
            [("huge", "cull"), ("b", "stop")],
            id="objects needed: whole objects, no trim",
        ),
    ],
)
def test_plan(
    needs: Needs, cands: list[Candidate], busy: tuple[str, ...], expected: list[tuple[str, str]]
) -> None:
    plan = CullPlan(
        needs,
        volume_of=volume_of,
        pinned=lambda c: c.name.startswith("pin-"),
        in_use=lambda c: c.name.startswith("use-"),
        trim=True,
    )
    assert decisions(plan, cands, Remover(frozenset(busy))) == expected


def test_until_stopped_never_stops_by_itself_and_never_trims() -> None:
    plan = CullPlan(Needs(until_stopped=True), volume_of=volume_of, trim=True)
    cands = [cand(f"o{i}", 100) for i in range(20)]
    assert decisions(plan, cands, Remover()) == [(f"o{i}", "cull") for i in range(20)]
    assert not plan.done


def test_tally() -> None:
    plan = CullPlan(Needs(bytes=10 * MB), volume_of=volume_of)
    plan.record(cand("a", 1), Outcome.CULLED, MB)
    plan.record(cand("b", 1, "Ierofs,w"), Outcome.TRIMMED, MB // 2)
    plan.record(cand("c", 1), Outcome.BUSY)
    plan.record(cand("d", 1), Outcome.GONE)
    t = plan.tally
    assert (t.culled, t.trimmed, t.acted, t.kept_in_use) == (1, 1, 2, 1)
    assert t.freed_bytes == MB + MB // 2
    assert t.freed_by_volume == {"Ierofs,v": MB, "Ierofs,w": MB // 2}
    fields = t.as_fields()
    assert fields["culled"] == 1 and fields["gone"] == 1 and "untrimmable" not in fields
    total = Tally()
    total.add(t)
    total.add(t)
    assert total.culled == 2 and total.freed_bytes == 2 * t.freed_bytes


@pytest.mark.parametrize(
    ("err", "outcome"),
    [
        (0, Outcome.CULLED),
        (errno.EBUSY, Outcome.BUSY),
        (errno.ESTALE, Outcome.GONE),
        (errno.ENOENT, Outcome.GONE),
        (errno.EIO, Outcome.FAILED),
        (errno.EINVAL, Outcome.FAILED),
    ],
)
def test_outcome_of_the_kernels_answer(err: int, outcome: Outcome) -> None:
    assert Outcome.of_cull(err) is outcome


# -- the loop ----------------------------------------------------------------------------


def test_run_plan_builds_no_decision_event_past_its_budget_when_debug_is_off() -> None:
    """A pass may cull tens of thousands of objects: at the daemon's usual level
    (info, a filtering logger) only the decisions within the info budget get an
    event; past it no per-object event is built, not even its fields."""
    described: list[str] = []

    def describe(c: Candidate) -> str:
        described.append(c.name)
        return c.name

    plan = CullPlan(Needs(bytes=3 * MB), volume_of=volume_of, pinned=lambda c: False)
    capture = structlog.testing.LogCapture()
    at_info = structlog.wrap_logger(
        structlog.ReturnLogger(),
        processors=[capture],
        wrapper_class=structlog.make_filtering_bound_logger(20),  # logging.INFO
    )
    tally = run_plan(
        plan,
        [cand("a", 1), cand("b", 1), cand("c", 1)],
        Remover(),
        describe=describe,
        logger=at_info,
        budget=EventBudget(burst=1, per_second=0.0),
    )
    assert tally.culled == 3 and described == ["a"]
    events = [e["event"] for e in capture.entries]
    assert events == ["cull.decision", "cull.decisions_suppressed"]


def test_run_plan_logs_one_decision_per_candidate() -> None:
    plan = CullPlan(Needs(bytes=2 * MB), volume_of=volume_of, pinned=lambda c: c.name == "p")
    cands = [cand("a", 1), cand("p", 1), cand("b", 1), cand("c", 1)]
    with structlog.testing.capture_logs() as logs:
        tally = run_plan(plan, cands, Remover(frozenset({"a"})), describe=lambda c: c.name)
    events = [(e["blob"], e["outcome"], e["bytes"]) for e in logs if e["event"] == "cull.decision"]
    assert events == [
        ("a", "busy", 0),
        ("p", "pinned", 0),
        ("b", "culled", MB),
        ("c", "culled", MB),
    ]
    assert all(e["reason"] for e in logs)
    assert tally.culled == 2 and tally[Outcome.BUSY] == 1 and tally[Outcome.PINNED] == 1


def test_run_plan_culls_whole_what_cannot_be_trimmed() -> None:
    plan = CullPlan(Needs(bytes=MB), volume_of=volume_of, trim=True)
    remover = Remover(untrimmable=True)
    tally = run_plan(plan, [cand("huge", 100), cand("b", 1)], remover, describe=lambda c: c.name)
    assert remover.done == [("trim", "huge"), ("cull", "huge")]
    assert tally.culled == 1 and tally.freed_bytes == 100 * MB


def test_run_plan_asks_whether_to_go_on_every_n_candidates() -> None:
    asked = []

    def keep_going() -> bool:
        asked.append(len(asked))
        return len(asked) < 2

    plan = CullPlan(Needs(until_stopped=True), volume_of=volume_of)
    tally = run_plan(
        plan,
        [cand(f"o{i}", 1) for i in range(100)],
        Remover(),
        describe=lambda c: c.name,
        keep_going=keep_going,
        check_every=10,
    )
    assert tally.culled == 20 and asked == [0, 1]


# -- random needs and candidates ----------------------------------------------------------


VOLUMES = st.sampled_from(["Ia", "Ib", "Ic"])


@given(
    st.lists(st.tuples(st.integers(1, 64), VOLUMES, st.booleans(), st.booleans()), max_size=40),
    st.integers(0, 512),
    st.integers(0, 10),
    st.dictionaries(VOLUMES, st.integers(1, 256), max_size=2),
)
def test_random_plans_free_what_is_needed_and_keep_what_is_kept(
    specs: list[tuple[int, str, bool, bool]],
    need_kb: int,
    need_objects: int,
    over_kb: dict[str, int],
) -> None:
    cands = [
        Candidate(i, kb * 2, f"/c/cache/{vol}/@00", f"{'p' if pin else ''}{'u' if use else ''}{i}")
        for i, (kb, vol, pin, use) in enumerate(specs)
    ]
    needs = Needs(need_kb * 1024, need_objects, {v: kb * 1024 for v, kb in over_kb.items()})
    plan = CullPlan(
        needs, volume_of=volume_of, pinned=lambda c: "p" in c.name, in_use=lambda c: "u" in c.name
    )
    remover = Remover()
    tally = run_plan(plan, cands, remover, describe=lambda c: c.name)
    culled = {name for what, name in remover.done if what == "cull"}
    assert not any("p" in n or "u" in n for n in culled), "a kept object was culled"
    cullable = [c for c in cands if "p" not in c.name and "u" not in c.name]
    met = tally.freed_bytes >= needs.bytes and tally.culled >= needs.objects
    over_left = {v for v, n in needs.volumes.items() if n > tally.freed_by_volume.get(v, 0)}
    assert plan.done == (met and not over_left)
    for c in cullable:  # what was left could not have helped
        if c.name not in culled:
            assert met and volume_of(c) not in over_left, c
    assert tally.freed_bytes == sum(c.blocks * 512 for c in cands if c.name in culled)
    # nothing was culled after the needs were met: dropping the last cull leaves a need
    if culled and not needs.volumes:
        last = next(c for c in reversed(cands) if c.name in culled)
        short = tally.freed_bytes - last.blocks * 512 < needs.bytes
        assert short or tally.culled - 1 < needs.objects


# -- decision events: one per decision, at info within a budget ------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_decisions_past_the_budget_go_to_debug_and_are_summed_up() -> None:
    """A pass over many objects logs its first decisions at info, the rest at debug,
    and says in one info event how many it held back, by outcome, and why."""
    clock = Clock()
    budget = EventBudget(burst=3, per_second=1.0, clock=clock)
    plan = CullPlan(Needs(bytes=8 * MB), volume_of=volume_of, pinned=lambda c: c.name == "p")
    cands = [cand("a", 1), cand("p", 1), *(cand(f"o{i}", 1) for i in range(8))]
    with structlog.testing.capture_logs() as logs:
        tally = run_plan(
            plan, cands, Remover(frozenset({"a"})), describe=lambda c: c.name, budget=budget
        )
    decided = [e for e in logs if e["event"] == "cull.decision"]
    assert len(decided) == 10 == sum(tally.counts.values()), "one event per decision"
    info = [(e["blob"], e["outcome"]) for e in decided if e["log_level"] == "info"]
    assert info == [("a", "busy"), ("p", "pinned"), ("o0", "culled")]
    assert all(e["log_level"] == "debug" for e in decided[3:])
    culled = [e for e in decided if e["outcome"] == "culled"]
    assert all(e["whole"] and e["size"] == MB and e["reason"] for e in culled)
    assert not decided[0]["whole"]  # kept: nothing given back
    [summary] = [e for e in logs if e["event"] == "cull.decisions_suppressed"]
    assert summary["log_level"] == "info"
    assert summary["suppressed"] == 7 and summary["by_outcome"] == {"culled": 7}
    assert summary["freed"] == 7 * MB and "at most 3" in summary["why"]
    # the budget refills with time: the next pass starts at info again
    clock.now += 2.0
    plan = CullPlan(Needs(bytes=MB), volume_of=volume_of)
    with structlog.testing.capture_logs() as logs:
        run_plan(plan, [cand("x", 1)], Remover(), describe=lambda c: c.name, budget=budget)
    assert [e["log_level"] for e in logs] == ["info"]


def test_a_dry_run_logs_its_decisions_at_debug_only() -> None:
    budget = EventBudget(burst=100)
    plan = CullPlan(Needs(bytes=2 * MB), volume_of=volume_of)
    with structlog.testing.capture_logs() as logs:
        run_plan(
            plan,
            [cand("a", 1), cand("b", 1)],
            Remover(),
            describe=lambda c: c.name,
            budget=budget,
            info=False,
        )
    assert [e["log_level"] for e in logs] == ["debug", "debug"]
    assert budget.take(), "a dry run took from the budget"


def test_event_budget_is_a_token_bucket() -> None:
    clock = Clock()
    budget = EventBudget(burst=2, per_second=0.5, clock=clock)
    assert [budget.take() for _ in range(3)] == [True, True, False]
    clock.now += 1.0  # half a token
    assert not budget.take()
    clock.now += 1.0
    assert budget.take() and not budget.take()
    clock.now += 100.0  # never more than the burst
    assert [budget.take() for _ in range(3)] == [True, True, False]


def test_a_blob_in_use_is_neither_culled_nor_trimmed() -> None:
    """fanotify mode: a mounted image's file is in use: never culled, never trimmed
    (a punch could race a read already allowed), whatever is still needed."""
    mounted = cand("mounted", 10)
    idle = cand("idle", 4)
    plan = CullPlan(
        Needs(bytes=6 * MB), volume_of=volume_of, in_use=lambda c: c is mounted, trim=True
    )
    assert plan.decide(mounted).outcome is Outcome.IN_USE
    assert plan.decide(idle).action is Action.CULL
