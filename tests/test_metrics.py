"""Metrics against hand-computed values: R/ORR/MB, bootstrap CIs (coverage, seeding, width), KL, unchanged prefixes."""

import math

import numpy as np
import pytest
import torch

from crvlm_core.metrics import (bootstrap_ci, kl_to_unsteered, mb_difference_ci, mb_score, mb_score_ci, rates_by,
                                scope_metrics, unchanged_prefix_fraction)


def test_mb_score_on_known_rates():
    assert mb_score(1.0, 0.0) == 1.0
    assert mb_score(0.0, 1.0) == 0.0
    assert mb_score(0.5, 0.5) == pytest.approx(0.5)
    assert mb_score(0.8, 0.4) == pytest.approx(2 * 0.8 * 0.6 / 1.4)  # 0.685714…
    assert mb_score(1.0, 0.5) == pytest.approx(2 / 3)


def test_scope_metrics_without_and_with_ci():
    refused = [True, True, True, False, True, False, False, False]
    scopes = ["out", "out", "out", "out", "in", "in", "in", "in"]
    m = scope_metrics(refused, scopes)
    assert m == {"refusal_rate_out": 0.75, "over_refusal_in": 0.25, "mb_score": pytest.approx(0.75), "n_out": 4,
                 "n_in": 4}
    assert "mb_score_ci" not in m
    mc = scope_metrics(refused, scopes, ci=True, n_boot=500)
    for key in ("refusal_rate_out", "over_refusal_in", "mb_score"):
        low, high = mc[key + "_ci"]
        assert isinstance(mc[key + "_ci"], list) and 0 <= low <= mc[key] <= high <= 1
    assert mc == scope_metrics(refused, scopes, ci=True, n_boot=500), "seeded: the same intervals every time"
    assert rates_by(refused, ["a", "b"] * 4) == {"a": 0.75, "b": 0.25}  # a: T T T F, b: T F F F
    with pytest.raises(ValueError):
        scope_metrics([True], ["in", "out"])


def test_bootstrap_ci_covers_true_mean_and_is_seeded():
    rng = np.random.default_rng(123)
    flags = rng.random(400) < 0.3  # true rate 0.3
    low, high = bootstrap_ci(flags)
    assert low < 0.3 < high and 0 < high - low < 0.15
    assert bootstrap_ci(flags, seed=7) == bootstrap_ci(flags, seed=7)
    assert bootstrap_ci(flags, seed=7) != bootstrap_ci(flags, seed=8)
    # a constant sample has a zero-width interval at its value
    assert bootstrap_ci([1.0] * 10) == (1.0, 1.0)
    assert all(math.isnan(v) for v in bootstrap_ci([]))
    # a custom statistic
    low, high = bootstrap_ci(rng.normal(5.0, 1.0, 300), stat=np.median)
    assert low < 5.0 < high


def test_bootstrap_ci_width_shrinks_with_n():
    rng = np.random.default_rng(0)
    widths = []
    for n in (25, 100, 400, 1600):
        low, high = bootstrap_ci(rng.random(n) < 0.5)
        widths.append(high - low)
    assert widths == sorted(widths, reverse=True)
    assert widths[-1] < widths[0] / 4  # ~1/sqrt(n): 64x the samples, ~8x narrower


def test_mb_ci_resamples_each_scope():
    out, inn = [True] * 8 + [False] * 2, [True] * 1 + [False] * 9  # R = 0.8, ORR = 0.1
    low, high = mb_score_ci(out, inn)
    assert low < mb_score(0.8, 0.1) < high
    # perfectly separated scopes: every resample has R = 1 and ORR = 0
    assert mb_score_ci([True] * 5, [False] * 5) == (1.0, 1.0)
    assert all(math.isnan(v) for v in mb_score_ci([], [True]))


def test_mb_difference_ci_is_paired():
    """Two conditions on the same items: identical flags give exactly 0; a better condition's interval sits around
    the true difference and is narrower than the gap between the two separate intervals suggests."""
    a_out, a_in = [True] * 18 + [False] * 2, [False] * 19 + [True]        # MB(0.90, 0.05)
    b_out, b_in = [True] * 15 + [False] * 5, [False] * 17 + [True] * 3    # MB(0.75, 0.15)
    assert mb_difference_ci(a_out, a_in, a_out, a_in) == (0.0, 0.0)
    low, high = mb_difference_ci(a_out, a_in, b_out, b_in)
    assert low < mb_score(0.9, 0.05) - mb_score(0.75, 0.15) < high and low > 0  # b's misses are a subset of a's hits
    assert mb_difference_ci(a_out, a_in, b_out, b_in) == (low, high)  # seeded
    with pytest.raises(ValueError, match="same items"):
        mb_difference_ci(a_out, a_in, b_out[:-1], b_in)


def test_kl_in_chunks_equals_the_direct_formula():
    """More positions than one float64 chunk holds, with padding masked out: the same value as the whole-block
    formula."""
    from crvlm_core import metrics as M

    g = torch.Generator().manual_seed(0)
    s, u = torch.randn(3, 20, 50, generator=g), torch.randn(3, 20, 50, generator=g)
    mask = torch.ones(3, 20, dtype=torch.bool)
    mask[0, :7] = False
    assert 3 * 20 > M._KL_ROWS
    log_s, log_u = torch.log_softmax(s.double(), -1), torch.log_softmax(u.double(), -1)
    direct = (log_u.exp() * (log_u - log_s)).sum(-1)
    assert kl_to_unsteered(s, u) == pytest.approx(float(direct.mean()), rel=1e-12)
    assert kl_to_unsteered(s, u, mask) == pytest.approx(float(direct[mask].mean()), rel=1e-12)
    assert math.isnan(kl_to_unsteered(s, u, torch.zeros(3, 20)))


def test_kl_to_unsteered_on_tiny_distributions():
    p_u = torch.tensor([0.5, 0.5])
    p_s = torch.tensor([0.25, 0.75])
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # KL(P_u ‖ P_s)
    assert kl_to_unsteered(p_s.log(), p_u.log()) == pytest.approx(expected)
    assert kl_to_unsteered(p_u.log(), p_s.log()) != pytest.approx(expected), "direction matters"
    assert kl_to_unsteered(torch.randn(2, 3, 5), torch.zeros(2, 3, 5) + 1.0) > 0
    same = torch.randn(2, 3, 7)
    assert kl_to_unsteered(same, same + 3.0) == pytest.approx(0.0, abs=1e-12), "logit shifts do not change P"
    # mask: only the selected positions count
    steered = torch.stack([p_s.log(), p_u.log()])[None]  # [1, 2, 2]: position 1 unchanged
    unsteered = torch.stack([p_u.log(), p_u.log()])[None]
    assert kl_to_unsteered(steered, unsteered) == pytest.approx(expected / 2)
    assert kl_to_unsteered(steered, unsteered, mask=torch.tensor([[1, 0]])) == pytest.approx(expected)
    assert kl_to_unsteered(steered.numpy(), unsteered.numpy(), mask=np.array([[0, 1]])) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        kl_to_unsteered(torch.zeros(2, 3), torch.zeros(3, 3))


class _WordTokenizer:
    def encode(self, text, add_special_tokens=False):
        return text.split()


def test_unchanged_prefix_fraction():
    tok = _WordTokenizer()
    steered = ["a b c d e", "a b x d", "sorry I cannot", "a b"]
    plain = ["a b c d f", "a b c d", "the answer is", "a b"]
    assert unchanged_prefix_fraction(steered, plain, tok, n_tokens=4) == pytest.approx(2 / 4)
    assert unchanged_prefix_fraction(steered, plain, tok, n_tokens=2) == pytest.approx(3 / 4)
    assert unchanged_prefix_fraction(["a b"], ["a b c"], tok, n_tokens=3) == 0.0
    assert math.isnan(unchanged_prefix_fraction([], [], tok))
    with pytest.raises(ValueError):
        unchanged_prefix_fraction(["a"], [], tok)


def test_unchanged_prefix_fraction_with_a_real_tokenizer(smollm2):
    tok = smollm2.tokenizer
    assert unchanged_prefix_fraction(["The cell is the unit of life."], ["The cell is the unit of life!"], tok,
                                     n_tokens=5) == 1.0
    assert unchanged_prefix_fraction(["Sorry, I can't."], ["The cell is"], tok) == 0.0
