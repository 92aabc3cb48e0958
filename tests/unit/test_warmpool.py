"""Warm-pool decisions (pure logic): every formula of ARCHITECTURE §3 and its edges."""

from dataclasses import replace

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from cnicore.instance_limits import InstanceLimits
from cnicore import settings as user_settings
from cnicore.pool import Pool, new_document
from cnicore.warmpool import (ENI_MIN_AGE, GROWTH_PAUSE, IP_RELEASE_INTERVAL, AssignIPs, ENIState, NewENI,
                              PoolSettings, ReleaseIPs, decide, grow_plan, measure)

M5 = InstanceLimits("m5.large", 3, 10)  # 3 ENIs x 9 secondary IPs
NOW = 10_000.0
OLD = NOW - ENI_MIN_AGE  # attached exactly long enough ago to be freed


def eni(device, total, assigned=0, cooling=0, attached_at=OLD):
    return ENIState(f"eni-{device:08x}", device, total, assigned, cooling, attached_at)


def S(**kw):
    return PoolSettings(**kw)


# --- figures: short / over / available ---------------------------------------------------------

@pytest.mark.parametrize("settings,enis,expect", [
    # WARM_IP_TARGET alone
    (S(warm_ip_target=5), [eni(0, 10, 3)], dict(available=7, short=0, over=2)),
    (S(warm_ip_target=5), [eni(0, 4, 2)], dict(available=2, short=3, over=0)),
    (S(warm_ip_target=5), [eni(0, 5, 0)], dict(available=5, short=0, over=0)),
    # MINIMUM_IP_TARGET raises short above the warm shortfall and caps over
    (S(warm_ip_target=2, minimum_ip_target=10), [eni(0, 4)], dict(short=6, over=0)),
    (S(warm_ip_target=2, minimum_ip_target=10), [eni(0, 9, 5), eni(1, 9)], dict(available=13, short=0, over=8)),
    (S(warm_ip_target=2, minimum_ip_target=10), [eni(0, 9, 5), eni(1, 3)], dict(available=7, short=0, over=2)),
    # WARM_IP_TARGET=0 with a minimum: the pool is held at max(minimum, assigned)
    (S(warm_ip_target=0, minimum_ip_target=10), [eni(0, 9, 9), eni(1, 3, 3)], dict(short=0, over=0)),
    (S(warm_ip_target=0, minimum_ip_target=10), [eni(0, 9, 2), eni(1, 3)], dict(short=0, over=2)),
    (S(minimum_ip_target=10), [], dict(total=0, short=10, over=0)),
    # IPs in cool-down count as available, yet are not free
    (S(warm_ip_target=3), [eni(0, 5, 2, cooling=3)], dict(available=3, free=0, cooling=3, short=0, over=0)),
    (S(warm_ip_target=1), [eni(0, 5, 1, cooling=2)], dict(available=4, free=2, short=0, over=3)),
    # no IP target (unset or 0, as upstream): WARM_ENI_TARGET in units of 9 IPs
    (S(), [eni(0, 9)], dict(mode="eni-target", short=0, over=0)),
    (S(), [eni(0, 9, 1)], dict(mode="eni-target", short=1, over=0)),
    (S(warm_ip_target=0, minimum_ip_target=0), [eni(0, 9, 1)], dict(mode="eni-target", short=1)),
    (S(warm_eni_target=2), [eni(0, 9, 1), eni(1, 9)], dict(available=17, short=1, over=0)),
    (S(warm_eni_target=2), [eni(0, 9), eni(1, 9), eni(2, 9)], dict(available=27, short=0, over=9)),
    # WARM_ENI_TARGET=0: too low only when nothing is available
    (S(warm_eni_target=0), [eni(0, 0)], dict(short=1, over=0)),
    (S(warm_eni_target=0), [eni(0, 9, 9)], dict(short=1, over=0)),
    (S(warm_eni_target=0), [eni(0, 9, 6)], dict(short=0, over=3)),
])
def test_figures(settings, enis, expect):
    figures = measure(enis, settings, M5)
    for key, value in expect.items():
        assert getattr(figures, key) == value, key
    assert figures.max_enis == 3 and figures.ips_per_eni == 9 and figures.capacity == 27


# --- growing -------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings,enis,grow,blocked", [
    # fill existing ENIs first, lowest device index first, by exactly `short` with IP targets
    (S(warm_ip_target=5), [eni(0, 9, 9), eni(1, 3, 3)], (AssignIPs("eni-00000001", 5),), None),
    (S(warm_ip_target=5), [eni(0, 6, 6), eni(1, 6, 6)],
     (AssignIPs("eni-00000000", 3), AssignIPs("eni-00000001", 2)), None),
    # then new ENIs, each at most one ENI's worth
    (S(warm_ip_target=10), [eni(0, 5, 5)], (AssignIPs("eni-00000000", 4), NewENI(6)), None),
    (S(minimum_ip_target=27), [eni(0, 0)], (AssignIPs("eni-00000000", 9), NewENI(9), NewENI(9)), None),
    # MAX_ENI below the instance limit caps the plan and says so
    (S(minimum_ip_target=27, max_eni=2), [eni(0, 0)], (AssignIPs("eni-00000000", 9), NewENI(9)), "MAX_ENI=2"),
    (S(warm_ip_target=1, max_eni=1), [eni(0, 9, 9)], (), "MAX_ENI=1"),
    # MAX_ENI above the instance limit: the instance limit rules
    (S(warm_ip_target=30, max_eni=8), [eni(0, 0)],
     (AssignIPs("eni-00000000", 9), NewENI(9), NewENI(9)), "ENI limit of m5.large (3 ENIs)"),
    # at the limit: nothing to do but explain
    (S(), [eni(0, 9, 9), eni(1, 9, 9), eni(2, 9, 9)], (), "at most 27 pod IPs (3 ENIs x 9 secondary IPs)"),
    # WARM_ENI_TARGET grows whole ENIs: fill the one with room to full, then a full new one
    (S(), [eni(0, 0)], (AssignIPs("eni-00000000", 9),), None),
    (S(), [eni(0, 4, 4)], (AssignIPs("eni-00000000", 5), NewENI(9)), None),
    (S(warm_eni_target=2), [eni(0, 9, 9)], (NewENI(9), NewENI(9)), None),
    (S(warm_eni_target=0), [eni(0, 9, 9)], (NewENI(9),), None),
])
def test_grow(settings, enis, grow, blocked):
    decision = decide(enis, settings, M5, NOW)
    assert decision.grow == grow
    assert decision.release == () and decision.free_eni is None
    if blocked is None:
        assert decision.blocked is None
    else:
        assert blocked in decision.blocked


def test_growth_pauses_after_insufficient_addresses():
    state, settings = [eni(0, 2, 2)], S(warm_ip_target=3)
    paused = decide(state, settings, M5, NOW, insufficient_addresses_at=NOW - GROWTH_PAUSE + 10)
    assert paused.grow == () and "paused for 10 s" in paused.blocked and paused.figures.short == 3
    resumed = decide(state, settings, M5, NOW, insufficient_addresses_at=NOW - GROWTH_PAUSE)
    assert resumed.grow == (AssignIPs("eni-00000000", 3),) and resumed.blocked is None


def test_no_secondary_ips_on_this_type_means_no_growth():
    tiny = InstanceLimits("t0.tiny", 2, 1)
    decision = decide([eni(0, 0)], S(), tiny, NOW)
    assert decision.grow == () and "at most 0 pod IPs" in decision.blocked


# --- giving back IPs and ENIs --------------------------------------------------------------------

@pytest.mark.parametrize("settings,enis,release,free_eni", [
    # surplus IPs go back from the highest device index down, only free (not cooling) ones
    (S(warm_ip_target=2), [eni(0, 9, 1), eni(1, 9, 2)],
     (ReleaseIPs("eni-00000001", 7), ReleaseIPs("eni-00000000", 6)), None),
    (S(warm_ip_target=0, minimum_ip_target=2), [eni(0, 9, 1, cooling=5)], (ReleaseIPs("eni-00000000", 3),), None),
    (S(warm_ip_target=3), [eni(0, 5, 2, cooling=3)], (), None),
    # an idle ENI goes as a whole when the others still meet both targets; the rest is trimmed
    (S(warm_ip_target=2), [eni(0, 9, 1), eni(1, 9)], (ReleaseIPs("eni-00000000", 6),), "eni-00000001"),
    # ... kept when needed for WARM_IP_TARGET, or for MINIMUM_IP_TARGET; an empty ENI goes
    (S(warm_ip_target=9), [eni(0, 9, 1), eni(1, 9)], (ReleaseIPs("eni-00000001", 8),), None),
    (S(warm_ip_target=1, minimum_ip_target=12), [eni(0, 9, 9), eni(1, 9)], (ReleaseIPs("eni-00000001", 6),), None),
    (S(warm_ip_target=1), [eni(0, 9, 7), eni(1, 0)], (ReleaseIPs("eni-00000000", 1),), "eni-00000001"),
    # never the primary, nor a young ENI, nor one with a pod or an IP in cool-down
    (S(warm_ip_target=1), [eni(0, 9)], (ReleaseIPs("eni-00000000", 8),), None),
    (S(warm_ip_target=1), [eni(0, 9), eni(1, 9, 5)],
     (ReleaseIPs("eni-00000001", 4), ReleaseIPs("eni-00000000", 8)), None),
    (S(warm_ip_target=1), [eni(0, 9, 9), eni(1, 9, attached_at=OLD + 1)], (ReleaseIPs("eni-00000001", 8),), None),
    (S(warm_ip_target=1), [eni(0, 9, 8), eni(1, 9, 1)], (ReleaseIPs("eni-00000001", 8),), None),
    (S(warm_ip_target=1), [eni(0, 9, 8), eni(1, 9, 0, cooling=1)],
     (ReleaseIPs("eni-00000001", 8), ReleaseIPs("eni-00000000", 1)), None),
    # WARM_ENI_TARGET: never single IPs; an ENI only once available >= (W + 1) * 9
    (S(), [eni(0, 9, 1), eni(1, 9)], (), None),
    (S(), [eni(0, 9), eni(1, 9)], (), "eni-00000001"),
    (S(), [eni(0, 9), eni(1, 9), eni(2, 9)], (), "eni-00000002"),
    (S(warm_eni_target=2), [eni(0, 9), eni(1, 9), eni(2, 9)], (), "eni-00000002"),
    (S(warm_eni_target=2), [eni(0, 9, 1), eni(1, 9), eni(2, 9)], (), None),
    (S(warm_eni_target=0), [eni(0, 9, 9), eni(1, 9)], (), "eni-00000001"),
    (S(), [eni(0, 9), eni(1, 9), eni(2, 9, 0, cooling=2)], (), "eni-00000001"),
])
def test_shrink(settings, enis, release, free_eni):
    decision = decide(enis, settings, M5, NOW)
    assert decision.grow == () and decision.blocked is None
    assert decision.release == release
    assert decision.free_eni == free_eni


def test_single_ips_go_back_at_most_every_interval():
    state, settings = [eni(0, 9, 1)], S(warm_ip_target=2)
    assert decide(state, settings, M5, NOW, last_release_at=NOW - IP_RELEASE_INTERVAL + 1).release == ()
    assert decide(state, settings, M5, NOW, last_release_at=NOW - IP_RELEASE_INTERVAL).release == (
        ReleaseIPs("eni-00000000", 6),)


def test_idle_eni_is_freed_even_while_single_ips_wait():
    decision = decide([eni(0, 9, 1), eni(1, 9)], S(warm_ip_target=2), M5, NOW, last_release_at=NOW)
    assert decision.free_eni == "eni-00000001" and decision.release == ()


# --- settings and state validation ---------------------------------------------------------------

@pytest.mark.parametrize("env,expect", [
    ({}, S()),
    ({"WARM_IP_TARGET": "", "MINIMUM_IP_TARGET": "", "WARM_ENI_TARGET": "", "MAX_ENI": ""}, S()),
    ({"WARM_IP_TARGET": "5", "MINIMUM_IP_TARGET": "10", "WARM_ENI_TARGET": "0", "MAX_ENI": "2"},
     S(warm_ip_target=5, minimum_ip_target=10, warm_eni_target=0, max_eni=2)),
    ({"WARM_IP_TARGET": "0"}, S()),  # upstream's noWarmIPTarget is 0: unset
])
def test_settings_from_the_users_settings(env, expect):
    assert PoolSettings.from_settings(user_settings.from_env(env, user_settings.IPAM)) == expect


@pytest.mark.parametrize("kwargs,setting", [
    (dict(warm_ip_target=-1), "WARM_IP_TARGET"),
    (dict(minimum_ip_target="10"), "MINIMUM_IP_TARGET"),
    (dict(warm_eni_target=None), "WARM_ENI_TARGET"),
    (dict(warm_eni_target=-2), "WARM_ENI_TARGET"),
    (dict(max_eni=0), "MAX_ENI"),
    (dict(max_eni=True), "MAX_ENI"),
    (dict(warm_ip_target=2.0), "WARM_IP_TARGET"),
])
def test_bad_settings_name_the_setting(kwargs, setting):
    with pytest.raises(ValueError, match=setting):
        PoolSettings(**kwargs)


def test_state_from_the_pool_documents_figures():
    pool = Pool(new_document({}), now=NOW, cooldown=30)
    pool.put_eni("eni-00000000", mac="02:00:00:00:00:01", device_number=0, subnet_cidr="10.0.1.0/24",
                 primary_ip="10.0.1.4", primary=True, attached_at=0.0)
    pool.set_secondary_ips("eni-00000000", ["10.0.1.5", "10.0.1.6", "10.0.1.7"])
    pool.assign("c1", "eth0")
    pool.assign("c2", "eth0")
    pool.release("c2", "eth0")
    state = [ENIState.from_stats(row) for row in pool.eni_stats()]
    assert state == [ENIState("eni-00000000", 0, 3, assigned=1, cooling=1, attached_at=0.0, ours=False)]
    assert measure(state, S(warm_ip_target=2), M5).short == 0


@pytest.mark.parametrize("args", [(0, -1), (0, 3, 4), (0, 3, 2, 2), (-1, 3), (0, 3, -1), (0, 3, 0, -1)])
def test_inconsistent_eni_state_is_refused(args):
    with pytest.raises(ValueError, match="inconsistent ENI state"):
        eni(*args)



def test_duplicate_enis_are_refused():
    with pytest.raises(ValueError, match="twice"):
        decide([eni(0, 1), eni(0, 2)], S(), M5, NOW)


# --- properties: applying a decision reaches the targets within the limits -----------------------

def apply(state, decision, limits):
    """The pool after carrying out `decision` (new IPs free, released IPs gone, ENI freed)."""
    by_id = {e.eni_id: e for e in state if e.eni_id != decision.free_eni}
    for step in decision.grow:
        if isinstance(step, AssignIPs):
            e = by_id[step.eni_id]
            by_id[e.eni_id] = replace(e, total=e.total + step.count)
        else:
            device = next(i for i in range(limits.max_enis) if i not in {e.device_index for e in by_id.values()})
            by_id[f"new{device}"] = ENIState(f"new{device}", device, step.count, attached_at=NOW)
    for step in decision.release:
        e = by_id[step.eni_id]
        assert step.count <= e.free
        by_id[e.eni_id] = replace(e, total=e.total - step.count)
    return list(by_id.values())


@st.composite
def pools(draw):
    limits = InstanceLimits("x.large", draw(st.integers(1, 5)), draw(st.integers(2, 12)))
    ips = limits.ips_per_eni
    count = draw(st.integers(1, limits.max_enis))
    state = []
    for device in range(count):
        total = draw(st.integers(0, ips))
        assigned = draw(st.integers(0, total))
        cooling = draw(st.integers(0, total - assigned))
        state.append(ENIState(f"eni-{device}", device, total, assigned, cooling,
                              draw(st.sampled_from([0.0, NOW - 1]))))
    target = st.one_of(st.none(), st.integers(0, 3 * ips))
    settings = PoolSettings(draw(target), draw(target), draw(st.integers(0, 3)),
                            draw(st.one_of(st.none(), st.integers(1, 6))))
    return state, settings, limits


@hsettings(max_examples=300, deadline=None)
@given(pools())
def test_decisions_reach_targets_within_limits(pool):
    state, settings, limits = pool
    decision = decide(state, settings, limits, NOW)
    after = apply(state, decision, limits)
    cap = min(limits.max_enis, settings.max_eni or limits.max_enis)
    assert len(after) <= max(cap, len(state))
    assert all(e.total <= limits.ips_per_eni for e in after)
    assert sum(e.assigned for e in after) == sum(e.assigned for e in state)  # no pod loses its IP
    figures = measure(after, settings, limits)
    if decision.grow and decision.blocked is None:
        assert figures.short == 0
    if settings.mode == "ip-target" and not decision.grow:
        # after giving back, the targets still hold
        assert figures.available >= min(settings.warm_ip_target or 0, measure(state, settings, limits).available)
        assert figures.total >= min(settings.minimum_ip_target or 0, measure(state, settings, limits).total)


def test_grow_plan_for_a_single_ip():
    """The no-agent ADD path asks for just one IP when the targets are met but nothing is free."""
    assert grow_plan([eni(0, 9, 9)], 1, 9, 3, whole_enis=False) == ((NewENI(1),), 0)
    assert grow_plan([eni(0, 9, 9), eni(1, 9, 9)], 1, 9, 2, whole_enis=False) == ((), 1)


# --- NodePool taking the IPs it gives back out of the pool (under the store lock) ------------------

def _node_pool_and_doc():
    from cnicore.poolmgr import NodePool
    from cnicore.warmpool import Decision
    cfg = user_settings.from_env({"WARM_IP_TARGET": "1", "IP_COOLDOWN_PERIOD": "0"})
    doc = new_document({"instance_type": "m5.large", "max_enis": 3, "ipv4_per_eni": 10})
    pool = Pool(doc, NOW)
    pool.put_eni("eni-a", mac="02:00:00:00:00:01", device_number=0, subnet_cidr="10.0.1.0/24",
                 primary_ip="10.0.1.5", primary=True, attached_at=0)
    pool.set_secondary_ips("eni-a", ["10.0.1.7", "10.0.1.8", "10.0.1.9"])
    return NodePool(cfg, log=None, clock=lambda: NOW), doc, Decision


@pytest.mark.parametrize("count,taken", [(0, []), (1, ["10.0.1.9"]), (2, ["10.0.1.8", "10.0.1.9"]),
                                         (5, ["10.0.1.7", "10.0.1.8", "10.0.1.9"])])
def test_take_releases_takes_exactly_the_count_asked_highest_first(count, taken):
    """A release step of 0 IPs takes none (a slice [-0:] took every free IP of the ENI)."""
    node_pool, doc, Decision = _node_pool_and_doc()
    decision = Decision(measure([], S(warm_ip_target=1), M5), release=(ReleaseIPs("eni-a", count),))
    assert node_pool._take_releases(doc, decision) == ({"eni-a": taken} if taken else {})
    assert sorted(doc["enis"]["eni-a"]["ips"]) == sorted({"10.0.1.7", "10.0.1.8", "10.0.1.9"} - set(taken))


def test_a_pool_short_at_the_instance_limit_is_told_apart_from_one_that_can_grow():
    full = [eni(0, 9, 9), eni(1, 9, 9), eni(2, 9, 9)]
    at_limit = decide(full, S(), M5, NOW)
    assert at_limit.limited and at_limit.blocked and not at_limit.grow
    growing = decide([eni(0, 9, 9)], S(), M5, NOW)
    assert not growing.limited and growing.grow and growing.blocked is None
    paused = decide([eni(0, 9, 9)], S(), M5, NOW, insufficient_addresses_at=NOW - 1)
    assert not paused.limited and paused.blocked


# --- prefix delegation (ENABLE_PREFIX_DELEGATION): upstream's ipamd formulas in /28 prefixes -------

from cnicore.warmpool import AssignPrefixes, ReleasePrefixes, prefix_grow_plan  # noqa: E402


def pfx(device, prefixes, assigned=0, cooling=0, free_prefixes=None, secondary=0, secondary_free=0,
        attached_at=OLD):
    """An ENI holding `prefixes` /28s (16 addresses each) and `secondary` secondary IPs; `assigned`
    and `cooling` are addresses of the prefixes (the secondary IPs not free are assigned)."""
    total = 16 * prefixes + secondary
    held = assigned + cooling
    if free_prefixes is None:
        free_prefixes = prefixes - -(-held // 16)  # pods packed into the lowest prefixes
    free_of_prefixes = 16 * prefixes - held
    return ENIState(f"eni-{device:08x}", device, total, assigned + secondary - secondary_free, cooling, attached_at,
                    True, prefixes, free_prefixes, free_of_prefixes)


PD = dict(prefix_delegation=True)


@pytest.mark.parametrize("settings,enis,expect", [
    # WARM_PREFIX_TARGET (P): too low when available < 16 P; grow by max(1, P - free prefixes)
    (S(**PD, warm_prefix_target=1), [pfx(0, 0)], dict(mode="prefix-target", short=1, over=0)),
    (S(**PD, warm_prefix_target=1), [pfx(0, 1)], dict(available=16, short=0, over=0)),
    (S(**PD, warm_prefix_target=1), [pfx(0, 1, assigned=1)], dict(available=15, short=1, over=0)),
    (S(**PD, warm_prefix_target=2), [pfx(0, 1, assigned=1)], dict(short=2)),
    (S(**PD, warm_prefix_target=1), [pfx(0, 3, assigned=1)], dict(free_prefixes=2, short=0, over=1)),
    # P = 0 (ipamd's own fallback): too low only when nothing is available; a prefix that leaves nothing
    # available is never given back (upstream's would be asked for again at the next round)
    (S(**PD, warm_prefix_target=0), [pfx(0, 1)], dict(short=0, over=0)),
    (S(**PD, warm_prefix_target=0), [pfx(0, 1, assigned=16)], dict(short=1)),
    (S(**PD, warm_prefix_target=0), [pfx(0, 2, assigned=3)], dict(short=0, over=1)),
    # an address in cool-down keeps its prefix from being free
    (S(**PD, warm_prefix_target=1), [pfx(0, 2, cooling=1)], dict(free_prefixes=1, short=0, over=0)),
    # WARM_IP_TARGET / MINIMUM_IP_TARGET in prefixes: short = ceil(short IPs / 16)
    (S(**PD, warm_ip_target=5), [pfx(0, 1, assigned=14)], dict(mode="ip-target", available=2, short=1, over=0)),
    (S(**PD, warm_ip_target=20), [pfx(0, 1)], dict(short=1)),
    (S(**PD, warm_ip_target=40), [pfx(0, 1)], dict(short=2)),
    (S(**PD, minimum_ip_target=40), [], dict(short=3)),
    # over = min(free prefixes, prefixes - ceil((assigned + WARM_IP_TARGET) / 16), prefixes - ceil(MIN / 16))
    (S(**PD, warm_ip_target=15), [pfx(0, 3, assigned=1)], dict(short=0, over=2)),
    (S(**PD, warm_ip_target=16), [pfx(0, 3, assigned=1)], dict(short=0, over=1)),
    (S(**PD, warm_ip_target=1, minimum_ip_target=40), [pfx(0, 4, assigned=1)], dict(over=1)),
    # after a switch to prefix mode, free secondary IPs count for nothing (they drain)...
    (S(**PD, warm_prefix_target=1), [pfx(0, 0, secondary=9, secondary_free=9)], dict(total=0, short=1)),
    # ... and in secondary-IP mode, so do the free addresses of prefixes
    (S(), [pfx(0, 1, assigned=2)], dict(mode="eni-target", total=2, available=0, short=9)),
])
def test_prefix_figures(settings, enis, expect):
    figures = measure(enis, settings, M5)
    for key, value in expect.items():
        assert getattr(figures, key) == value, key
    if settings.prefix_delegation:  # 3 ENIs x 9 prefixes x 16 addresses
        assert figures.ips_per_eni == 144 and figures.capacity == 432


def test_prefix_mode_grows_prefixes_on_existing_enis_first_then_new_enis():
    assert decide([pfx(0, 0)], S(**PD, warm_prefix_target=1), M5, NOW).grow == (AssignPrefixes("eni-00000000", 1),)
    # the primary ENI's slots are full (9 prefixes): a new ENI with as many prefixes as needed
    full = pfx(0, 9, assigned=144)
    assert decide([full], S(**PD, warm_prefix_target=2), M5, NOW).grow == (NewENI(2, prefixes=True),)
    # secondary IPs still held take slots too
    assert prefix_grow_plan([pfx(0, 2, secondary=5)], 4, 9, 3) == ((AssignPrefixes("eni-00000000", 2),
                                                                     NewENI(2, prefixes=True)), 0)
    assert prefix_grow_plan([pfx(0, 9), pfx(1, 9), pfx(2, 8)], 3, 9, 3) == ((AssignPrefixes("eni-00000002", 1),), 2)


def test_prefix_mode_at_the_instance_limit_names_prefixes():
    full = [pfx(d, 9, assigned=144) for d in range(3)]
    decision = decide(full, S(**PD, warm_prefix_target=1), M5, NOW)
    assert decision.limited and not decision.grow
    assert decision.blocked == ("the ENI limit of m5.large (3 ENIs) reached: at most 432 pod IPs "
                                "(3 ENIs x 9 /28 prefixes x 16 addresses)")


def test_prefix_mode_gives_back_free_prefixes_highest_first_at_most_every_interval():
    enis = [pfx(0, 2, assigned=3), pfx(1, 3, attached_at=NOW)]
    decision = decide(enis, S(**PD, warm_prefix_target=1), M5, NOW)
    assert decision.release == (ReleasePrefixes("eni-00000001", 3),)
    assert decide(enis, S(**PD, warm_prefix_target=1), M5, NOW, last_release_at=NOW - 1).release == ()


def test_prefix_mode_frees_an_idle_eni_only_if_the_rest_meets_the_target():
    idle = pfx(1, 1)
    assert decide([pfx(0, 2, assigned=3), idle], S(**PD, warm_prefix_target=1), M5, NOW).free_eni == idle.eni_id
    assert decide([pfx(0, 1, assigned=3), idle], S(**PD, warm_prefix_target=1), M5, NOW).free_eni is None


def test_switching_the_mode_drains_the_other_kind():
    # prefix mode: free secondary IPs go back; assigned ones stay with their pods
    mixed = [pfx(0, 1, secondary=5, secondary_free=3)]
    assert ReleaseIPs("eni-00000000", 3) in decide(mixed, S(**PD, warm_prefix_target=1), M5, NOW).release
    # secondary-IP mode: free prefixes go back, a prefix with a pod or an address cooling stays
    prefixes = [pfx(0, 3, assigned=1, cooling=16, free_prefixes=1, secondary=9)]
    decision = decide(prefixes, S(), M5, NOW)
    assert decision.release == (ReleasePrefixes("eni-00000000", 1),)


def test_prefix_mode_pauses_after_insufficient_cidr_blocks_and_refuses_clearly_on_a_xen_type():
    reason = "EC2 answered InsufficientCidrBlocks for subnet subnet-1 (10.0.0.0/24): ..."
    paused = decide([pfx(0, 0)], S(**PD), M5, NOW, insufficient_addresses_at=NOW - 1, insufficient_reason=reason)
    assert not paused.grow and paused.blocked.startswith(reason) and "paused for 119 s more" in paused.blocked
    assert decide([pfx(0, 0)], S(**PD), M5, NOW + GROWTH_PAUSE, insufficient_addresses_at=NOW - 1).grow
    m4 = InstanceLimits("m4.large", 2, 10)
    refused = decide([pfx(0, 0)], S(**PD), m4, NOW, prefixes_refused_at=NOW - 1)
    assert refused.limited and not refused.grow
    assert "m4.large" in refused.blocked and "ENABLE_PREFIX_DELEGATION" in refused.blocked


def test_prefix_state_from_the_pool_document():
    pool = Pool(new_document({}), now=NOW, cooldown=30)
    pool.put_eni("eni-00000000", mac="02:00:00:00:00:01", device_number=0, subnet_cidr="10.0.0.0/24",
                 primary_ip="10.0.0.10", primary=True, attached_at=0.0)
    pool.set_secondary_ips("eni-00000000", ["10.0.0.20"], ["10.0.0.48/28", "10.0.0.32/28"])
    got = [pool.assign(f"c{i}", "eth0", prefixes=True).ip for i in range(3)]
    assert got == ["10.0.0.32", "10.0.0.33", "10.0.0.34"]  # lowest prefix first, the secondary IP left alone
    pool.release("c2", "eth0")
    [row] = pool.eni_stats()
    assert (row["prefixes"], row["free_prefixes"], row["free_secondary"]) == (2, 1, 1)
    assert pool.free_prefixes("eni-00000000") == ["10.0.0.48/28"] and pool.free_ips("eni-00000000") == ["10.0.0.20"]
    state = ENIState.from_stats(row)
    assert (state.total, state.assigned, state.cooling, state.free_of_prefixes) == (33, 2, 1, 29)
    # secondary-IP mode prefers the secondary IP; then falls back to a prefix address
    assert pool.assign("s1", "eth0").ip == "10.0.0.20"
    assert pool.assign("s2", "eth0").ip == "10.0.0.35"
    # a prefix EC2 no longer lists leaves with its free addresses; an assigned one is kept and reported
    lost = pool.set_secondary_ips("eni-00000000", ["10.0.0.20"], ["10.0.0.48/28"])
    assert lost == ["10.0.0.32", "10.0.0.33", "10.0.0.35"] and "10.0.0.36" not in pool.enis["eni-00000000"]["ips"]
