"""Win-rate statistics against hand computations (dadpo/eval/stats.py), with scores made by the
real verdict parser and two-order rule where a judge is simulated."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import dadpo.eval.stats as stats
from dadpo.eval.stats import bootstrap_ci95, length_controlled_rate, summarize
from dadpo.eval.verdicts import order_outcome, orders_agree, parse_verdict

NAN = float("nan")
FIELDS = {"win", "tie", "loss", "parse_failures", "win_rate", "ci95", "position_consistency", "lc_win_rate",
          "mean_length", "length_unit"}


def judge_both_orders(replies_first: list[str], replies_second: list[str]):
    """Scores and agreement per prompt from a judge's raw replies in the two orders."""
    scores, agree = [], []
    for first, second in zip(replies_first, replies_second):
        a, b = parse_verdict(first), parse_verdict(second)
        outcome = order_outcome(a, b)
        scores.append(NAN if outcome is None else outcome)
        agree.append(None if outcome is None else orders_agree(a, b))
    return np.array(scores), agree


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


# ---------------------------------------------------------------- judges that tell nothing


def test_a_judge_that_always_answers_A_gives_only_ties_and_no_consistency():
    n = 12
    scores, agree = judge_both_orders(["Clearly the first. [[A]]"] * n, ["The first again. [[A]]"] * n)
    result = summarize(scores, candidate_lengths=np.arange(n) + 5, baseline_lengths=np.full(n, 7), agree=agree)
    assert (result["win"], result["tie"], result["loss"], result["parse_failures"]) == (0, n, 0, 0)
    assert result["win_rate"] == 0.5 and result["ci95"] == [0.5, 0.5]
    assert result["position_consistency"] == 0.0
    assert result["lc_win_rate"] == pytest.approx(0.5, abs=1e-9)  # every score is 0.5: nothing for length to explain
    assert result["mean_length"] == pytest.approx(np.mean(np.arange(n) + 5))
    assert result["by_category"] == {}


def test_a_judge_that_never_gives_a_verdict_gives_only_parse_failures_and_no_rate():
    n = 9
    scores, agree = judge_both_orders(["I would rather not say."] * n, ["Both have merits [A] and [B]."] * n)
    assert np.isnan(scores).all()
    result = summarize(scores, candidate_lengths=np.full(n, 10), baseline_lengths=np.full(n, 12), agree=agree,
                       categories=["x"] * n)
    assert (result["win"], result["tie"], result["loss"], result["parse_failures"]) == (0, 0, 0, n)
    for field in ("win_rate", "ci95", "position_consistency", "lc_win_rate"):
        assert result[field] is None, field  # not 0: nothing was judged
    assert result["mean_length"] == 10.0
    assert result["by_category"]["x"]["win_rate"] is None and result["by_category"]["x"]["parse_failures"] == n


# ---------------------------------------------------------------- counts and rates by hand


def test_win_rate_of_a_small_table_by_hand():
    # first order (candidate = A), second order (candidate = B)
    first = ["[[A]]", "[[A]]", "[[B]]", "[[C]]", "[[A]]", "nothing", "[[B]]", "[[A]]"]
    second = ["[[B]]", "[[B]]", "[[A]]", "[[C]]", "[[A]]", "[[B]]", "[[B]]", "[[ b ]]"]
    # outcome:  win,    win,   loss,   tie,    tie,   failure, tie,    win
    # agree:    yes,    yes,   yes,    yes,    no,    -,       no,     yes
    scores, agree = judge_both_orders(first, second)
    np.testing.assert_array_equal(scores, [1, 1, 0, 0.5, 0.5, NAN, 0.5, 1])
    cand = np.array([10, 20, 30, 40, 50, 60, 70, 80])
    base = np.full(8, 45)
    result = summarize(scores, candidate_lengths=cand, baseline_lengths=base, agree=agree, length_unit="characters")
    assert (result["win"], result["tie"], result["loss"], result["parse_failures"]) == (3, 3, 1, 1)
    assert result["win_rate"] == pytest.approx((3 + 3 / 2) / (3 + 3 + 1))  # 4.5 / 7
    assert result["position_consistency"] == pytest.approx(5 / 7)
    assert result["mean_length"] == pytest.approx(45.0) and result["length_unit"] == "characters"
    low, high = result["ci95"]
    assert 0 <= low <= result["win_rate"] <= high <= 1
    assert set(result) == FIELDS | {"by_category"}
    json.dumps(result, allow_nan=False)  # plain Python numbers, JSON-ready


def test_reward_scores_are_fractional_and_count_by_their_side_of_one_half():
    scores = np.array([0.8, 0.3, 0.5, 0.99, NAN])
    result = summarize(scores, candidate_lengths=[1, 2, 3, 4, 5], baseline_lengths=[1, 2, 3, 4, 5])
    assert (result["win"], result["tie"], result["loss"], result["parse_failures"]) == (2, 1, 1, 1)
    assert result["win_rate"] == pytest.approx((0.8 + 0.3 + 0.5 + 0.99) / 4)
    assert result["position_consistency"] is None  # no positions without agree
    assert result["lc_win_rate"] == pytest.approx(result["win_rate"])  # equal lengths


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="3 scores but 2 candidate_lengths"):
        summarize([1, 0, 0.5], candidate_lengths=[1, 2], baseline_lengths=[1, 2, 3])
    with pytest.raises(ValueError, match="2 categories"):
        summarize([1, 0, 0.5], candidate_lengths=[1, 2, 3], baseline_lengths=[1, 2, 3], categories=["a", "b"])


# ---------------------------------------------------------------- the bootstrap interval


def test_bootstrap_interval_exact_small_cases():
    # One prompt: every resample is that prompt.
    assert bootstrap_ci95([0.7], 200, 0) == (0.7, 0.7)
    # Two prompts scored 0 and 1: a resample's mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4, so
    # with many resamples the 2.5% and 97.5% percentiles are exactly 0 and 1.
    assert bootstrap_ci95([0.0, 1.0], 20000, 3) == (0.0, 1.0)
    # NaN (parse failures) are dropped before resampling.
    assert bootstrap_ci95([0.7, NAN], 50, 0) == (0.7, 0.7)
    with pytest.raises(ValueError, match="no judged scores"):
        bootstrap_ci95([NAN], 10, 0)


def test_bootstrap_interval_brackets_the_rate_and_narrows_with_more_prompts():
    rng = np.random.default_rng(7)
    widths = []
    for n in (40, 400, 4000):
        scores = rng.choice([0.0, 0.5, 1.0], size=n, p=[0.3, 0.2, 0.5])
        low, high = bootstrap_ci95(scores, 2000, seed=0)
        rate = scores.mean()
        assert low < rate < high
        # Against the normal approximation, rate +- 1.96 sd / sqrt(n): close for every n here.
        half = 1.96 * scores.std() / math.sqrt(n)
        assert (high - low) == pytest.approx(2 * half, rel=0.2)
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]
    assert widths[0] / widths[2] == pytest.approx(10, rel=0.25)  # width ~ 1 / sqrt(n)


def test_bootstrap_is_fixed_by_its_seed_and_independent_of_memory_chunks(monkeypatch):
    scores = np.random.default_rng(1).random(300)
    first = bootstrap_ci95(scores, 500, seed=5)
    assert bootstrap_ci95(scores, 500, seed=5) == first
    assert bootstrap_ci95(scores, 500, seed=6) != first
    monkeypatch.setattr(stats, "_BOOTSTRAP_CELLS", 300 * 7)  # 7 resamples at a time instead of all 500
    assert bootstrap_ci95(scores, 500, seed=5) == first


def test_summarize_without_bootstrap_gives_no_interval():
    result = summarize([1, 0], candidate_lengths=[1, 1], baseline_lengths=[1, 1], bootstrap=0)
    assert result["ci95"] is None and result["win_rate"] == 0.5


# ---------------------------------------------------------------- length control


def test_lc_rate_equals_the_raw_rate_when_lengths_are_equal():
    scores = np.array([1, 1, 0, 0.5, 1, 0.5, 0, 1, NAN])
    assert length_controlled_rate(scores, np.zeros(9)) == pytest.approx(np.nanmean(scores))
    # Equal lengths but not zero difference? The difference is what counts: a constant offset has no spread.
    assert length_controlled_rate(scores, np.full(9, 30.0)) == pytest.approx(np.nanmean(scores))
    assert length_controlled_rate([NAN, NAN], [1.0, 2.0]) is None


def test_lc_rate_of_a_judge_that_prefers_length_alone_is_one_half():
    """Two groups: candidate longer (d = +5) in 8 prompts, shorter (d = -5) in 2. A judge that only
    looks at length prefers the longer answer with probability 7/8 either way round. The raw rate,
    (8 * 7/8 + 2 * 1/8) / 10 = 0.725, only reflects that the candidate is usually longer. The model
    fits both groups exactly: sigma(b0 + b1 t) = 7/8 and sigma(b0 - b1 t) = 1/8 (t = tanh(5 / s)), so
    b0 = (logit 7/8 + logit 1/8) / 2 = 0 and the rate at equal length is sigma(0) = 0.5."""
    scores = np.array([7 / 8] * 8 + [1 / 8] * 2)
    diffs = np.array([5.0] * 8 + [-5.0] * 2)
    assert scores.mean() == pytest.approx(0.725)
    assert length_controlled_rate(scores, diffs) == pytest.approx(0.5, abs=1e-3)  # (the small ridge on b1)
    # Wins, ties and losses: 7 of the 8 longer answers win; of the 2 shorter ones, a tie and a loss.
    wins = np.array([1.0] * 7 + [0.0] + [0.5, 0.0])
    # group +5: mean 7/8; group -5: mean 1/4 -> b0 = (logit 7/8 + logit 1/4) / 2
    expected = sigmoid((logit(7 / 8) + logit(1 / 4)) / 2)
    assert length_controlled_rate(wins, diffs) == pytest.approx(expected, abs=1e-3)
    assert abs(expected - 0.5) < abs(wins.mean() - 0.5)  # toward one half


def test_lc_rate_of_two_groups_by_hand_for_any_rates():
    for p_longer, p_shorter, d_longer, d_shorter, n_longer, n_shorter in [
            (0.9, 0.4, 3.0, -3.0, 6, 4), (0.6, 0.2, 40.0, -40.0, 3, 9), (0.3, 0.3, 10.0, -10.0, 5, 5)]:
        scores = np.array([p_longer] * n_longer + [p_shorter] * n_shorter)
        diffs = np.array([d_longer] * n_longer + [d_shorter] * n_shorter)
        expected = sigmoid((logit(p_longer) + logit(p_shorter)) / 2)
        assert length_controlled_rate(scores, diffs) == pytest.approx(expected, abs=2e-3)


def test_lc_rate_moves_toward_one_half_for_a_length_biased_judge_on_many_prompts():
    rng = np.random.default_rng(3)
    diffs = rng.normal(60, 100, 3000)  # the candidate is usually longer
    # The judge decides by length only: P(candidate wins) = sigma(2.5 tanh(d / sd)), 0.5 at equal length.
    p = 1 / (1 + np.exp(-2.5 * np.tanh(diffs / diffs.std())))
    scores = (rng.random(3000) < p).astype(float)
    raw, controlled = scores.mean(), length_controlled_rate(scores, diffs)
    assert raw > 0.65
    assert abs(controlled - 0.5) < 0.04 and abs(controlled - 0.5) < abs(raw - 0.5) / 4
    # And a judge that ignores length keeps its rate.
    fair = (rng.random(3000) < 0.7).astype(float)
    assert length_controlled_rate(fair, diffs) == pytest.approx(fair.mean(), abs=0.03)


def test_lc_rate_is_the_same_in_tokens_or_characters():
    rng = np.random.default_rng(4)
    diffs = rng.normal(5, 20, 200)
    scores = rng.choice([0.0, 0.5, 1.0], size=200)
    assert length_controlled_rate(scores, diffs * 4) == pytest.approx(length_controlled_rate(scores, diffs), abs=1e-9)


def test_lc_rate_when_length_separates_the_outcomes_stays_finite():
    scores = np.array([1.0] * 8 + [0.0] * 2)
    diffs = np.array([5.0] * 8 + [-5.0] * 2)
    rate = length_controlled_rate(scores, diffs)
    assert 0.5 < rate < scores.mean()
    assert length_controlled_rate(np.ones(5), np.arange(5.0)) == 1.0  # all wins: nothing to control
    assert length_controlled_rate(np.zeros(5), np.arange(5.0)) == 0.0


def test_lc_rate_against_a_general_purpose_optimizer():
    optimize = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(11)
    diffs = rng.normal(-20, 50, 400)
    scores = rng.choice([0.0, 0.5, 1.0], size=400, p=[0.4, 0.2, 0.4]) * (diffs < 30) + (diffs >= 30) * 1.0
    x = np.tanh(diffs / diffs.std())

    def loss(beta):
        p = np.clip(1 / (1 + np.exp(-(beta[0] + beta[1] * x))), 1e-15, 1 - 1e-15)
        return -np.mean(scores * np.log(p) + (1 - scores) * np.log(1 - p)) + 0.5 * stats._LC_L2 * beta[1] ** 2

    best = optimize.minimize(loss, [0.0, 0.0], method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-14,
                                                                                  "maxiter": 20000})
    assert length_controlled_rate(scores, diffs) == pytest.approx(sigmoid(best.x[0]), abs=1e-5)


# ---------------------------------------------------------------- per category


def test_by_category():
    scores = np.array([1, 0, 0.5, NAN, 1, 1, 0])
    cand = np.array([10, 20, 30, 40, 50, 60, 70])
    base = np.full(7, 35)
    agree = [True, True, False, None, True, False, True]
    categories = ["math", "chat", "math", "chat", None, "math", float("nan")]
    result = summarize(scores, candidate_lengths=cand, baseline_lengths=base, agree=agree, categories=categories,
                       bootstrap=300, seed=2)
    assert list(result["by_category"]) == ["chat", "math"]  # sorted; prompts without a category left out
    math_, chat = result["by_category"]["math"], result["by_category"]["chat"]
    assert set(math_) == FIELDS and set(chat) == FIELDS
    # math: prompts 0, 2, 5: scores 1, 0.5, 1
    assert (math_["win"], math_["tie"], math_["loss"], math_["parse_failures"]) == (2, 1, 0, 0)
    assert math_["win_rate"] == pytest.approx(2.5 / 3)
    assert math_["position_consistency"] == pytest.approx(1 / 3)
    assert math_["mean_length"] == pytest.approx((10 + 30 + 60) / 3)
    # chat: prompts 1, 3: a loss and a parse failure
    assert (chat["win"], chat["tie"], chat["loss"], chat["parse_failures"]) == (0, 0, 1, 1)
    assert chat["win_rate"] == 0.0 and chat["ci95"] == [0.0, 0.0] and chat["position_consistency"] == 1.0
    # Each category is the summary of its own prompts.
    rows = [0, 2, 5]
    alone = summarize(scores[rows], candidate_lengths=cand[rows], baseline_lengths=base[rows],
                      agree=[agree[i] for i in rows], bootstrap=300, seed=2)
    assert {k: v for k, v in alone.items() if k != "by_category"} == math_
    # Overall: all seven prompts.
    assert (result["win"], result["tie"], result["loss"], result["parse_failures"]) == (3, 1, 2, 1)
