"""fit_budget_curve: known laws are recovered, the band holds at its stated rate beyond the data, and
data that do not support a power law are said to (never a crash, a NaN or a wild extrapolation)."""

import math
import subprocess
import sys

import numpy as np
import pytest

from cooldown_callbacks import BudgetFit, fit_budget_curve


def law(E, A, alpha):
    return lambda T: E + A * np.asarray(T, dtype=np.float64) ** -alpha


@pytest.mark.parametrize("E,A,alpha,T", [
    pytest.param(1.2, 29.2, 0.6, [125, 250, 375, 500, 625, 750], id="charlm-like"),
    pytest.param(2.0, 30.0, 0.5, [1000, 2000, 4000, 8000], id="geometric"),
    pytest.param(0.0, 5.0, 0.05, [10, 100, 1000, 10_000, 100_000], id="slow-exponent"),
    pytest.param(3.5, 4e4, 1.8, [100, 150, 200, 300, 500], id="fast-exponent"),
])
def test_an_exact_law_is_recovered(E, A, alpha, T):
    f = fit_budget_curve(T, law(E, A, alpha)(T))
    assert f.supported and f.reason == ""
    assert f.E == pytest.approx(E, abs=1e-6) and f.A == pytest.approx(A, rel=1e-5)
    assert f.alpha == pytest.approx(alpha, rel=1e-6)
    assert f.predict(4 * max(T)) == pytest.approx(law(E, A, alpha)(4 * max(T)), rel=1e-7)


def test_noisy_laws_are_recovered_within_their_uncertainty():
    rng = np.random.default_rng(1)
    truth = law(1.2, 29.2, 0.6)
    T = np.arange(1, 13) * 125.0
    f = fit_budget_curve(T, truth(T) + rng.normal(0, 0.005, T.size))
    se = np.sqrt(np.diag(np.asarray(f.cov)))
    for got, want, s in zip((f.E, f.A, f.alpha), (1.2, 29.2, 0.6), se):
        assert abs(got - want) < 4 * s, (got, want, s)
    assert f.sigma == pytest.approx(0.005, rel=0.5)


@pytest.mark.parametrize("T,sigma", [
    pytest.param(np.arange(1, 7) * 125.0, 0.01, id="6-forks"),
    pytest.param(np.array([125.0, 250, 500, 1000]), 0.02, id="4-geometric"),
    pytest.param(np.arange(1, 13) * 125.0, 0.03, id="12-forks-noisy"),
])
def test_the_band_beyond_the_data_holds_at_its_stated_rate(T, sigma):
    """A new measurement at 2x and 4x the last budget falls inside the 90% band about 90% of the time."""
    rng = np.random.default_rng(0)
    truth = law(1.2, 29.2, 0.6)
    n, hits = 200, {2: 0, 4: 0}
    for _ in range(n):
        f = fit_budget_curve(T, truth(T) + rng.normal(0, sigma, T.size), level=0.9)
        for k in hits:
            lo, hi = f.band(k * T.max())
            hits[k] += lo <= truth(k * T.max()) + rng.normal(0, sigma) <= hi
    for k, h in hits.items():
        assert 0.84 <= h / n <= 0.96, (k, h / n)  # 0.9 +- 3 binomial standard deviations


def test_wider_levels_give_wider_bands_and_arrays_work():
    T = [125, 250, 375, 500, 625]
    f = fit_budget_curve(T, [2.27, 1.95, 1.83, 1.74, 1.70])
    lo50, hi50 = f.band(2000, level=0.5)
    lo99, hi99 = f.band(2000, level=0.99)
    assert lo99 < lo50 < f.predict(2000) < hi50 < hi99
    p = f.predict(np.array([1000, 2000]))
    assert isinstance(p, np.ndarray) and p.shape == (2,) and isinstance(f.predict(1000), float)
    lo, hi = f.band(np.array([1000, 2000]))
    assert lo.shape == hi.shape == (2,) and np.all(hi - lo > 0) and (hi - lo)[1] > (hi - lo)[0]
    assert f.gain(625) == pytest.approx(f.predict(625) - f.predict(687.5)) and f.gain(625) > 0


def test_flat_and_rising_losses_are_not_a_fit():
    rng = np.random.default_rng(2)
    T = np.arange(1, 9) * 100.0
    flat = fit_budget_curve(T, 2.0 + rng.normal(0, 0.01, T.size))
    rising = fit_budget_curve(T, 2.0 + 0.001 * T)
    for f in (flat, rising):
        assert not f.supported and "do not decrease" in f.reason and f.A == 0.0
        assert f.predict(1e6) == pytest.approx(np.mean(f.losses))  # the flat line: the mean
        assert math.isfinite(f.predict(1e6)) and np.isfinite(f.band(1e6)).all()
        assert "the data do not support a fit" in f.summary() and "predicted" not in f.summary()
    assert flat.predict(1e6) == pytest.approx(2.0, abs=0.02)


def test_an_exponent_the_budgets_cannot_pin_down_is_said():
    T = np.array([100.0, 110, 120, 130])
    f = fit_budget_curve(T, 1.0 + 1e5 * T ** -4.0)  # steeper than the range allows
    assert not f.supported and "edge" in f.reason
    assert any("span only" in n for n in f.notes)


def test_three_budgets_fit_exactly_with_an_infinite_band_unless_the_noise_is_given():
    T, y = [100, 200, 400], [3.0, 2.5, 2.2]
    f = fit_budget_curve(T, y)
    assert f.supported and np.allclose(f.predict(np.array(T)), y)
    assert f.band(800) == (-math.inf, math.inf) and "no degree of freedom" in f.notes[0]
    g = fit_budget_curve(T, y, sigma=0.01)
    lo, hi = g.band(800)
    assert g.sigma_known and math.isfinite(lo) and lo < g.predict(800) < hi


@pytest.mark.parametrize("steps,losses,kw,match", [
    ([100, 200], [2.0, 1.9], {}, r"three or more budgets .* got 2 distinct"),
    ([100, 100, 200, 200], [2.0, 2.0, 1.9, 1.9], {}, r"got 2 distinct"),
    ([100, 200, 300], [2.0, 1.9], {}, r"Invalid losses: 2 losses for 3 steps"),
    ([0, 200, 300], [2.0, 1.9, 1.8], {}, r"Invalid steps: budgets must be > 0"),
    ([100, 200, 300], [2.0, float("nan"), 1.8], {}, r"Invalid losses: every value must be finite"),
    ([[100, 200, 300]], [[2.0, 1.9, 1.8]], {}, r"Invalid steps: must be a flat sequence"),
    (["a", 200, 300], [2.0, 1.9, 1.8], {}, r"Invalid steps: must be a sequence of numbers"),
    ([100, 200, 300], [2.0, 1.9, 1.8], {"level": 1.0}, r"Invalid level \(1.0\)"),
    ([100, 200, 300], [2.0, 1.9, 1.8], {"sigma": 0}, r"Invalid sigma \(0\)"),
])
def test_bad_input_names_the_argument(steps, losses, kw, match):
    with pytest.raises(ValueError, match=match):
        fit_budget_curve(steps, losses, **kw)


def test_summary_states_predictions_at_2x_and_4x_and_the_gain_of_10_percent():
    T = [125, 250, 375, 500, 625, 750]
    f = fit_budget_curve(T, law(1.2, 29.2, 0.6)(T) + np.array([0.004, -0.003, 0.002, -0.004, 0.001, 0.002]))
    text = f.summary()
    assert isinstance(f, BudgetFit) and str(f) == text
    assert "at 2x the last budget (T = 1500)" in text and "at 4x the last budget (T = 3000)" in text
    assert "90% band" in text and "10% more steps (T = 825) would lower it by" in text


def test_the_core_imports_without_scipy_and_the_fit_names_the_extra():
    code = ("import sys; sys.modules['scipy'] = None\n"
            "import cooldown_callbacks\n"
            "try:\n"
            "    cooldown_callbacks.fit_budget_curve([1, 2, 3], [3.0, 2.0, 1.5])\n"
            "except ImportError as e:\n"
            "    print('ImportError:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ImportError: fit_budget_curve needs scipy: pip install 'cooldown-callbacks[fit]'" in out.stdout


def test_a_negative_asymptote_is_flagged_as_a_transient():
    """Early in training the cooled loss falls about linearly in log T: a power law fits it only with E < 0."""
    T = np.array([125.0, 250, 375, 500, 625, 750, 875, 1000, 1125])
    y = 3.5 - 0.27 * np.log(T) + np.array([0.003, -0.002, 0.001, 0.0, -0.003, 0.002, 0.001, -0.001, 0.0])
    f = fit_budget_curve(T, y)
    assert f.E < 0 and any("fit from a later budget" in n for n in f.notes)
    assert "note: E = " in f.summary()
