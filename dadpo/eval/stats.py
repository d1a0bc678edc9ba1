"""Win-rate statistics of one model against the baseline: pure functions on numpy arrays.

A score per prompt s_i in [0, 1]: 1 a win, 0.5 a tie, 0 a loss (an LM judge's two orders, an answer
match), or a reward judge's P(win) = sigma(r_c - r_b). NaN marks a parse failure: it is counted and
left out of every rate, never scored as a loss.
"""

from __future__ import annotations

import numpy as np

_BOOTSTRAP_CELLS = 1 << 22  # resampled scores held at once (32 MiB of float64), whatever the prompt count
_LC_L2 = 1e-4               # ridge on the length slope: keeps the fit finite when length separates the outcomes


def _floats(values, what: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{what}: expected one value per prompt, got shape {array.shape}")
    return array


def bootstrap_ci95(scores, n: int, seed: int) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean score over prompts.

    For b = 1..n draw m prompts with replacement (m = the number of judged prompts), take the mean
    of their scores, mean_b; the interval is (q_2.5, q_97.5) of {mean_b}. NaN scores are dropped
    first. The draws come from numpy's default_rng(seed): the same inputs give the same interval."""
    values = _floats(scores, "scores")
    values = values[~np.isnan(values)]
    if values.size == 0:
        raise ValueError("bootstrap_ci95: no judged scores")
    if n < 1:
        raise ValueError(f"bootstrap_ci95: n must be at least 1, got {n}")
    rng = np.random.default_rng(seed)
    rows_at_once = max(1, _BOOTSTRAP_CELLS // values.size)
    means = np.empty(n, dtype=np.float64)
    for start in range(0, n, rows_at_once):
        rows = min(rows_at_once, n - start)
        means[start:start + rows] = values[rng.integers(0, values.size, size=(rows, values.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def _fit_logistic(x: np.ndarray, y: np.ndarray, l2: float) -> tuple[float, float]:
    """(b0, b1) minimising  mean_i[-y_i log p_i - (1 - y_i) log(1 - p_i)] + l2/2 * b1^2,
    p_i = sigma(b0 + b1 x_i), by Newton's method (IRLS) with step halving."""
    design = np.stack([np.ones_like(x), x], axis=1)
    penalty = np.array([0.0, l2])
    beta = np.array([np.log(y.mean() / (1 - y.mean())), 0.0])  # the intercept-only optimum

    def objective(b):
        z = design @ b
        # -[y log sigma(z) + (1-y) log sigma(-z)] = log(1 + e^z) - y z, computed stably
        return float(np.mean(np.logaddexp(0.0, z) - y * z) + 0.5 * l2 * b[1] ** 2)

    current = objective(beta)
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-(design @ beta)))
        gradient = design.T @ (p - y) / y.size + penalty * beta
        weights = p * (1 - p)
        hessian = (design * weights[:, None]).T @ design / y.size + np.diag(penalty)
        try:
            step = np.linalg.solve(hessian, gradient)
        except np.linalg.LinAlgError:
            step = np.linalg.lstsq(hessian, gradient, rcond=None)[0]
        scale = 1.0
        while scale > 1e-8:
            trial = beta - scale * step
            value = objective(trial)
            if value <= current + 1e-15:
                break
            scale /= 2
        else:
            break  # no descent left: at the optimum to rounding
        beta, current = trial, value
        if np.max(np.abs(scale * step)) < 1e-10:
            break
    return float(beta[0]), float(beta[1])


def length_controlled_rate(scores, length_diff) -> float | None:
    """The win rate the judge would give at equal lengths.

    With d_i = candidate length - baseline length and s = the standard deviation of d over the judged
    prompts, fit the logistic regression  P(win | d) = sigma(b0 + b1 tanh(d / s))  to the scores
    (fractional targets: a tie counts as half a win) by maximum likelihood, with a small ridge
    (1e-4 / 2 * b1^2 on the mean log-loss) so a judge that length alone decides stays finite. The
    rate at zero difference is sigma(b0), since tanh(0) = 0. (d is scaled by s, not centred: the
    centre is d = 0, equal lengths, not the mean difference.) Equal lengths (s = 0) or an
    all-win / all-loss set give the raw rate mean(s_i); nothing judged gives None."""
    values = _floats(scores, "scores")
    diffs = _floats(length_diff, "length_diff")
    if values.shape != diffs.shape:
        raise ValueError(f"length_controlled_rate: {values.size} scores but {diffs.size} length differences")
    judged = ~np.isnan(values)
    values, diffs = values[judged], diffs[judged]
    if values.size == 0:
        return None
    raw = float(values.mean())
    spread = float(diffs.std())
    if spread == 0.0 or raw <= 0.0 or raw >= 1.0:
        return raw
    intercept, _ = _fit_logistic(np.tanh(diffs / spread), values, _LC_L2)
    return float(1.0 / (1.0 + np.exp(-intercept)))


def _summary(scores: np.ndarray, candidate_lengths: np.ndarray, baseline_lengths: np.ndarray,
             agree: np.ndarray | None, bootstrap: int, seed: int, length_unit: str) -> dict:
    judged = ~np.isnan(scores)
    values = scores[judged]
    win_rate = float(values.mean()) if values.size else None
    ci95 = list(bootstrap_ci95(values, bootstrap, seed)) if values.size and bootstrap > 0 else None
    consistency = None
    if agree is not None:
        agreement = agree[judged]
        agreement = agreement[~np.isnan(agreement)]
        consistency = float(agreement.mean()) if agreement.size else None
    return {
        "win": int(np.sum(values > 0.5)),
        "tie": int(np.sum(values == 0.5)),
        "loss": int(np.sum(values < 0.5)),
        "parse_failures": int(np.sum(~judged)),
        "win_rate": win_rate,
        "ci95": ci95,
        "position_consistency": consistency,
        "lc_win_rate": length_controlled_rate(values, (candidate_lengths - baseline_lengths)[judged]),
        "mean_length": float(candidate_lengths.mean()) if candidate_lengths.size else None,
        "length_unit": length_unit,
    }


def summarize(scores, *, candidate_lengths, baseline_lengths, agree=None, categories=None,
              bootstrap: int = 1000, seed: int = 0, length_unit: str = "tokens") -> dict:
    """Every statistic of one model against the baseline, overall and per category.

    With s_i the score of prompt i and J the prompts judged (s_i not NaN):
      win / tie / loss = #{i in J: s_i > 0.5} / #{s_i = 0.5} / #{s_i < 0.5}; parse_failures = #{not J}
      win_rate = mean_{i in J} s_i  (= (win + tie/2) / (win + tie + loss) for 0 / 0.5 / 1 scores);
        None, not 0, when J is empty (ci95 then None too)
      ci95 = bootstrap_ci95(s_J, bootstrap, seed)  (None when bootstrap is 0)
      position_consistency = mean_{i in J, agree_i known} agree_i  (LM judges; None when agree is None)
      lc_win_rate = length_controlled_rate(s_J, cand_len_J - base_len_J)
      mean_length = the candidate's mean response length over all prompts, in length_unit
      by_category = the same fields over each category's prompts (prompts without one left out);
        {} when categories is None.
    agree: per prompt, whether its two orders agreed (NaN or None where it is not known)."""
    values = _floats(scores, "scores")
    candidate = _floats(candidate_lengths, "candidate_lengths")
    baseline = _floats(baseline_lengths, "baseline_lengths")
    agreement = None if agree is None else _floats(agree, "agree")  # None -> NaN
    for what, array in (("candidate_lengths", candidate), ("baseline_lengths", baseline), ("agree", agreement)):
        if array is not None and array.shape != values.shape:
            raise ValueError(f"summarize: {values.size} scores but {array.size} {what}")
    summary = _summary(values, candidate, baseline, agreement, bootstrap, seed, length_unit)
    summary["by_category"] = {}
    if categories is not None:
        labels = np.array([None if c is None or c != c else str(c) for c in categories], dtype=object)  # NaN: none
        if labels.shape != values.shape:
            raise ValueError(f"summarize: {values.size} scores but {labels.size} categories")
        for label in sorted({c for c in labels if c is not None}):
            rows = labels == label
            summary["by_category"][label] = _summary(values[rows], candidate[rows], baseline[rows],
                                                     None if agreement is None else agreement[rows],
                                                     bootstrap, seed, length_unit)
    return summary
