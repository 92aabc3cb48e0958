"""Pods waiting for an IP count as demand in the warm-pool decisions (issue #16's cold start): one
round grows for every waiting pod, and nothing they need is given back."""

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from cnicore.instance_limits import InstanceLimits
from cnicore.warmpool import (ENI_MIN_AGE, AssignIPs, AssignPrefixes, ENIState, NewENI, PoolSettings, ReleaseIPs,
                              decide, measure)

M5 = InstanceLimits("m5.large", 3, 10)      # 3 ENIs x 9 secondary IPs
M5X = InstanceLimits("m5.xlarge", 4, 15)    # 4 ENIs x 14 secondary IPs
NOW = 10_000.0
OLD = NOW - ENI_MIN_AGE


def eni(device, total, assigned=0, cooling=0):
    return ENIState(f"eni-{device}", device, total, assigned, cooling, OLD)


def pfx(device, prefixes, assigned):
    """An ENI holding `prefixes` /28s, `assigned` addresses of them taken (packed low)."""
    free_prefixes = prefixes - -(-assigned // 16)
    return ENIState(f"eni-{device}", device, 16 * prefixes, assigned, 0, OLD, True, prefixes, free_prefixes,
                    16 * prefixes - assigned)


def test_a_node_given_30_pods_grows_every_eni_they_need_in_one_round():
    # m5.xlarge, WARM_ENI_TARGET=1: the primary ENI's 14 IPs taken, 16 pods waiting
    state = [eni(0, 14, 14)]
    without = decide(state, PoolSettings(), M5X, NOW)
    assert without.grow == (NewENI(14),)  # what the targets alone ask: one ENI per round
    with_waiting = decide(state, PoolSettings(), M5X, NOW, waiting=16)
    assert with_waiting.grow == (NewENI(14), NewENI(14), NewENI(14))  # 16 waiting + one warm ENI
    assert with_waiting.figures.waiting == 16 and with_waiting.blocked is None


@pytest.mark.parametrize("settings,state,waiting,grow", [
    # WARM_IP_TARGET=2, 4 available, 6 waiting: 2 short of the 6, plus the 2 warm
    (PoolSettings(warm_ip_target=2), [eni(0, 9, 5)], 6, (NewENI(4),)),
    # MINIMUM_IP_TARGET alone (WARM_IP_TARGET 0): exactly the waiting pods beyond what is available
    (PoolSettings(minimum_ip_target=4), [eni(0, 5, 5)], 3, (AssignIPs("eni-0", 3),)),
    # waiting pods that what is available already covers change nothing
    (PoolSettings(warm_ip_target=2), [eni(0, 9, 1)], 3, ()),
    # WARM_ENI_TARGET=0: whole ENIs for the waiting pods
    (PoolSettings(warm_eni_target=0), [eni(0, 9, 9)], 10, (NewENI(9), NewENI(9))),
])
def test_waiting_pods_are_demand_in_every_mode(settings, state, waiting, grow):
    assert decide(state, settings, M5, NOW, waiting=waiting).grow == grow


def test_prefix_mode_grows_prefixes_for_the_waiting_pods():
    settings = PoolSettings(prefix_delegation=True, warm_prefix_target=1)
    state = [pfx(0, 1, 16)]
    assert measure(state, settings, M5).short == 1
    # 40 waiting + 16 warm = 56 addresses = 4 prefixes
    assert decide(state, settings, M5, NOW, waiting=40).grow == (AssignPrefixes("eni-0", 4),)


def test_what_waiting_pods_need_is_not_given_back():
    settings = PoolSettings(warm_ip_target=2)
    state = [eni(0, 9, 2), eni(1, 9)]
    alone = decide(state, settings, M5, NOW)
    assert (alone.free_eni, alone.release) == ("eni-1", (ReleaseIPs("eni-0", 5),))
    waited = decide(state, settings, M5, NOW, waiting=10)  # 16 available - 10 waiting - 2 warm: 4 go back
    assert (waited.free_eni, waited.release) == (None, (ReleaseIPs("eni-1", 4),))
    # WARM_ENI_TARGET: an idle ENI the waiting pods need stays
    idle = [eni(0, 9), eni(1, 9)]
    assert decide(idle, PoolSettings(), M5, NOW).free_eni == "eni-1"
    assert decide(idle, PoolSettings(), M5, NOW, waiting=1).free_eni is None


@hsettings(max_examples=300, deadline=None)
@given(st.integers(1, 4), st.integers(2, 14), st.data())
def test_after_one_round_every_waiting_pod_has_an_ip_unless_the_limits_say_why(max_enis, ips, data):
    limits = InstanceLimits("x.large", max_enis, ips + 1)
    count = data.draw(st.integers(1, max_enis))
    state = []
    for device in range(count):
        total = data.draw(st.integers(0, ips))
        state.append(eni(device, total, data.draw(st.integers(0, total))))
    settings = data.draw(st.sampled_from([PoolSettings(), PoolSettings(warm_eni_target=0),
                                          PoolSettings(warm_ip_target=1), PoolSettings(minimum_ip_target=3)]))
    waiting = data.draw(st.integers(0, 3 * ips))
    decision = decide(state, settings, limits, NOW, waiting=waiting)
    added = sum(step.count for step in decision.grow)
    available = sum(e.total - e.assigned for e in state)
    if decision.blocked is None:
        assert available + added >= waiting
    else:
        # short only at the instance's limits: every slot of every ENI the type allows is then used
        assert decision.limited and sum(e.total for e in state) + added == max_enis * ips
