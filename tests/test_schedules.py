"""Schedule core: equality with transformers' helpers, composition, serialisation, validation."""

import itertools
import json
import math
import pickle

import pytest
import torch
from transformers.optimization import (
    get_cosine_schedule_with_warmup,
    get_inverse_sqrt_schedule,
    get_linear_schedule_with_warmup,
    get_wsd_schedule,
)

from cooldown_callbacks import (
    WSD,
    Cooldown,
    Cooled,
    Noam,
    RSqrt,
    Tabulated,
    WithCooldowns,
    cosine,
    linear,
    schedule_from_dict,
)


def hf_multipliers(make, n):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make(opt)
    return [lam(t) for lam in sched.lr_lambdas for t in range(n)]


WSD_CASES = list(itertools.product([0, 1, 7, 50], [0, 1, 13, 100], [1, 2, 9, 64],
                                   ["linear", "cosine", "1-sqrt"], ["linear", "cosine", "1-sqrt"]))


@pytest.mark.parametrize("W,stable,c,decay,warm", WSD_CASES)
def test_cooled_wsd_equals_transformers_get_wsd_schedule(W, stable, c, decay, warm):
    s = W + stable
    ours = WSD(warmup_steps=W, warmup_shape=warm).cooled(at=s, cooldown=Cooldown(steps=c, shape=decay))
    n = s + c + 5
    ref = hf_multipliers(lambda o: get_wsd_schedule(o, W, num_decay_steps=c, num_stable_steps=stable,
                                                    warmup_type=warm, decay_type=decay), n)
    for t in range(n):
        assert ours(t) == pytest.approx(ref[t], abs=1e-12, rel=1e-12), t


@pytest.mark.parametrize("m", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("decay", ["linear", "cosine", "1-sqrt"])
def test_cooled_wsd_min_lr_ratio_matches(m, decay):
    ours = WSD(10, warmup_start=m).cooled(at=40, cooldown=Cooldown(steps=25, shape=decay, final_ratio=m))
    ref = hf_multipliers(lambda o: get_wsd_schedule(o, 10, num_decay_steps=25, num_stable_steps=30,
                                                    decay_type=decay, min_lr_ratio=m), 80)
    assert [ours(t) for t in range(80)] == pytest.approx(ref, abs=1e-12)


@pytest.mark.parametrize("W,tau", [(0, None), (1, None), (10, None), (100, None), (10, 5), (10, 1000), (0, 3)])
def test_rsqrt_equals_transformers_inverse_sqrt(W, tau):
    ours = RSqrt(warmup_steps=W, timescale=tau)
    ref = hf_multipliers(lambda o: get_inverse_sqrt_schedule(o, W, timescale=tau), 500)
    assert [ours(t) for t in range(500)] == pytest.approx(ref, abs=1e-12, rel=1e-12)


@pytest.mark.parametrize("T,W", [(10, 0), (100, 10), (1000, 37)])
def test_fixed_horizon_baselines_equal_transformers(T, W):
    cos_ref = hf_multipliers(lambda o: get_cosine_schedule_with_warmup(o, W, T), T)
    lin_ref = hf_multipliers(lambda o: get_linear_schedule_with_warmup(o, W, T), T + 3)
    assert [cosine(T, W)(t) for t in range(T)] == pytest.approx(cos_ref, abs=1e-12)
    assert [linear(T, W)(t) for t in range(T + 3)] == pytest.approx(lin_ref, abs=1e-12)


@pytest.mark.parametrize("shape,p,expected", [
    pytest.param("rex", 0.5, 2 / 3, id="rex-0.5"),
    pytest.param("rex", 0.8, 1 / 3, id="rex-0.8"),
    pytest.param("rex", 0.9, 0.1818181818, id="rex-0.9"),
    pytest.param("linear", 0.25, 0.75, id="linear"),
    pytest.param("1-sqrt", 0.25, 0.5, id="1-sqrt"),
    pytest.param("cosine", 0.5, 0.5, id="cosine"),
    pytest.param("square", 0.5, 0.75, id="square"),
    pytest.param("exponential", 0.1, 0.5, id="exponential-half-life"),
])
def test_shape_values(shape, p, expected):
    cd = Cooldown(steps=100, shape=shape)
    assert cd.factor(int(p * 100), 100) == pytest.approx(expected, abs=1e-9)


def test_noam_peaks_at_warmup_and_decays_as_rsqrt():
    s = Noam(warmup_steps=100)
    assert s(0) == 0.0 and s(50) == 0.5 and s(100) == 1.0 and s(400) == 0.5


def test_cooled_rsqrt_decays_from_the_lr_at_the_fork():
    main = RSqrt(warmup_steps=100)
    c = main.cooled(at=400, cooldown=Cooldown(steps=100, shape="linear"))
    assert c(399) == main(399)
    assert c(400) == main(400) == 0.5
    assert c(450) == pytest.approx(0.25)
    assert c(500) == 0.0 and c(10_000) == 0.0


def test_cooldown_fraction_is_fraction_of_cooled_run():
    for at in [8, 80, 800, 1234]:
        cd = Cooldown(fraction=0.2)
        c = cd.length(at)
        assert c / (at + c) == pytest.approx(0.2, abs=1 / (at + c))
    assert Cooldown(fraction=0.5).length(0) == 1
    assert WSD(0).cooled(at=800, cooldown=Cooldown(fraction=0.2)).total_steps == 1000


def test_with_cooldowns_is_wsds():
    main = WSD(2)
    s = main.with_cooldowns(at=[10, 30], cooldown=Cooldown(steps=4, shape="linear"), rewarm_steps=3)
    vals = [s(t) for t in range(40)]
    assert vals[9] == 1.0
    assert vals[10:14] == [1.0, 0.75, 0.5, 0.25]
    assert vals[14:17] == [0.25, 0.5, 0.75]  # re-warm
    assert vals[17] == 1.0 and vals[29] == 1.0
    assert vals[30:34] == [1.0, 0.75, 0.5, 0.25]
    no_rewarm = main.with_cooldowns(at=[10], cooldown=Cooldown(steps=4, shape="linear"))
    assert no_rewarm(14) == 1.0


@pytest.mark.parametrize("sched", [
    WSD(10), RSqrt(5, 20), Noam(7), WSD(3).cooled(at=20, cooldown=Cooldown(fraction=0.25, shape="rex")),
    RSqrt(4).with_cooldowns(at=[10, 50], cooldown=Cooldown(steps=5), rewarm_steps=2), cosine(100, 10, 0.1),
    WSD(0).cooled(at=5, cooldown=Cooldown(steps=5, shape=Tabulated((1.0, 0.3, 0.0)))),
], ids=lambda s: type(s).__name__)
def test_serialisation_and_pickle_round_trip(sched):
    d = sched.to_dict()
    back = schedule_from_dict(d)
    assert back == sched
    assert [back(t) for t in range(120)] == [sched(t) for t in range(120)]
    assert pickle.loads(pickle.dumps(sched)) == sched
    import json
    assert schedule_from_dict(json.loads(json.dumps(d))) == sched


def test_lambda_lr_bridge_sets_base_times_multiplier():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr": 0.3}], lr=0.3)
    s = WSD(4).cooled(at=6, cooldown=Cooldown(steps=4, shape="linear"))
    sched = s.lambda_lr(opt)
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == [0.3 * s(t) for t in range(12)]
    pickle.dumps(sched.state_dict())


@pytest.mark.parametrize("make,match", [
    (lambda: WSD(-1), r"warmup_steps \(-1\)"),
    (lambda: WSD(1.5), r"warmup_steps \(1.5\)"),
    (lambda: WSD(True), r"warmup_steps \(True\)"),
    (lambda: WSD(10, warmup_shape="exp"), r"warmup_shape \('exp'\).*linear"),
    (lambda: WSD(10, warmup_start=2.0), r"warmup_start"),
    (lambda: RSqrt(10, timescale=0), r"timescale \(0\)"),
    (lambda: Noam(0), r"warmup_steps \(0\)"),
    (lambda: Cooldown(), r"exactly one of steps"),
    (lambda: Cooldown(steps=10, fraction=0.2), r"exactly one of steps"),
    (lambda: Cooldown(steps=0), r"Cooldown steps \(0\): must be an integer >= 1"),
    (lambda: Cooldown(fraction=1.0), r"Cooldown fraction \(1.0\)"),
    (lambda: Cooldown(fraction=0.0), r"Cooldown fraction \(0.0\)"),
    (lambda: Cooldown(fraction=float("nan")), r"Cooldown fraction"),
    (lambda: Cooldown(steps=5, shape="cosin"), r"Cooldown shape \('cosin'\).*1-sqrt"),
    (lambda: Cooldown(steps=5, final_ratio=-0.1), r"final_ratio"),
    (lambda: Cooldown(steps=5, shape="exponential", half_life=0), r"half_life"),
    (lambda: WSD(5).cooled(at=-1, cooldown=Cooldown(steps=5)), r"Invalid at \(-1\)"),
    (lambda: WSD(5).cooled(at=10, cooldown=5), r"Invalid cooldown"),
    (lambda: Cooled(main=3, at=1, cooldown=Cooldown(steps=1)), r"Invalid main"),
    (lambda: WSD(0).with_cooldowns(at=[10, 12], cooldown=Cooldown(steps=5)), r"after the next fork at 12"),
    (lambda: WithCooldowns(WSD(0), at=(10,), cooldown=Cooldown(steps=1), rewarm_steps=-2), r"rewarm_steps"),
    (lambda: cosine(10, 10), r"warmup_steps \(10\): must be < total_steps"),
    (lambda: linear(0), r"total_steps \(0\)"),
    (lambda: Tabulated((1.0,)), r"at least 2"),
    (lambda: Tabulated((0.0, 1.0)), r"first sample"),
    (lambda: schedule_from_dict({"type": "Nope"}), r"'type' must be one of"),
])
def test_invalid_arguments_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_schedules_are_finite_and_nonnegative_over_long_horizons():
    for s in [WSD(100), RSqrt(100), RSqrt(0), Noam(10), cosine(1000, 10, 0.1)]:
        vals = s.values(20_000)
        assert all(math.isfinite(v) and v >= 0 for v in vals)


@pytest.mark.parametrize("make,expected", [
    (lambda: WSD(20.0), WSD(20)),  # transformers 5: TrainingArguments.warmup_steps is a float
    (lambda: RSqrt(4.0, timescale=8.0), RSqrt(4, timescale=8)),
    (lambda: Noam(10.0), Noam(10)),
    (lambda: Cooldown(steps=3.0), Cooldown(steps=3)),
    (lambda: cosine(10.0, 2.0), cosine(10, 2)),
])
def test_integral_float_step_counts_are_accepted_as_ints(make, expected):
    s = make()  # stored as ints: the JSON config (checkpoints, records) says 20, not 20.0
    assert s == expected and json.dumps(s.to_dict()) == json.dumps(expected.to_dict())
