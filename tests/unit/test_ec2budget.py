"""cnicore.ec2budget: when a node may call EC2 (pure logic, a hand-moved clock, a seeded RNG)."""

import random

import pytest

from cnicore.ec2budget import (REASON_ACTION, REASON_DISAGREE, REASON_INTERVAL, REASON_START, EC2Budget,
                               disagreements)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def budget(clock, seed=1, **kw):
    return EC2Budget(clock, random.Random(seed), **kw)


def test_a_read_is_due_at_start_then_not_again_before_the_interval():
    clock = Clock()
    b = budget(clock, interval=3600, jitter=0.2)
    assert b.read_due() == REASON_START
    b.read()
    for _ in range(2879):  # 2880 s = 0.8 * 3600: the earliest a jittered interval can end
        clock.now += 1
        b.compared(True)
        assert b.read_due() is None
    clock.now += 3600 * 0.4 + 1  # past the latest end
    assert b.read_due() == REASON_INTERVAL


def test_intervals_are_jittered_so_nodes_started_together_spread_out():
    ends = set()
    for seed in range(50):
        clock = Clock()
        b = budget(clock, seed=seed, interval=3600, jitter=0.2)
        b.read()
        while b.read_due() is None:
            clock.now += 10
        ends.add(clock.now - 1000)
    assert min(ends) >= 2880 and max(ends) <= 4320 + 10
    assert len(ends) > 20


def test_an_action_of_ours_is_read_once():
    clock = Clock()
    b = budget(clock)
    b.read()
    b.acted()
    assert b.read_due() == REASON_ACTION
    b.read()
    assert b.read_due() is None


def test_a_disagreement_is_waited_out_for_the_grace_then_read():
    clock = Clock()
    b = budget(clock, imds_grace=30)
    b.read()
    b.compared(False)
    clock.now += 29
    b.compared(False)
    assert b.read_due() is None  # IMDS may still be catching up with EC2
    clock.now += 1
    b.compared(False)
    assert b.read_due() == REASON_DISAGREE
    b.read()
    assert b.read_due() is None


def test_a_disagreement_that_ends_within_the_grace_costs_nothing():
    clock = Clock()
    b = budget(clock, imds_grace=30)
    b.read()
    b.compared(False)
    clock.now += 20
    b.compared(True)
    clock.now += 20
    b.compared(False)  # a new one: timed from now
    clock.now += 20
    assert b.read_due() is None


def test_throttling_backs_off_every_ec2_use_doubling_with_jitter_up_to_the_max():
    clock = Clock()
    b = budget(clock, backoff_base=2, backoff_max=16)
    b.read()
    b.acted()
    pauses = []
    for _ in range(6):
        b.throttled()
        left = b.backoff_left()
        pauses.append(left)
        assert not b.may_act() and b.read_due() is None  # reads and actions alike
        clock.now += left
        assert b.may_act()
    for pause, delay in zip(pauses, [2, 4, 8, 16, 16, 16]):
        assert delay / 2 <= pause <= delay
    assert b.read_due() == REASON_ACTION  # the pending read comes back after the pause
    b.succeeded()
    b.throttled()
    assert b.backoff_left() <= 2  # a success starts the doubling over


def test_backoff_jitter_differs_between_nodes():
    pauses = set()
    for seed in range(20):
        b = budget(Clock(), seed=seed)
        b.throttled()
        b.throttled()
        pauses.add(round(b.backoff_left(), 6))
    assert len(pauses) > 10


@pytest.mark.parametrize("kw", [dict(interval=0), dict(jitter=1), dict(jitter=-0.1), dict(imds_grace=-1),
                                dict(backoff_base=0), dict(backoff_base=10, backoff_max=5)])
def test_bad_figures_are_refused(kw):
    with pytest.raises(ValueError):
        budget(Clock(), **kw)


def test_disagreements_name_the_enis_that_differ():
    store = {"eni-a": {"10.0.0.5"}, "eni-b": {"10.0.0.6", "10.0.0.7"}, "eni-c": set()}
    imds = {"eni-a": {"10.0.0.5"}, "eni-b": {"10.0.0.6"}, "eni-d": {"10.0.0.9"}}
    assert disagreements(store, imds) == ["eni-b", "eni-c", "eni-d"]
    assert disagreements(store, store) == []
