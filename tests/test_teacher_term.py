"""How big the teacher term is: dadpo.loss.teacher_term_scale / term_sizes / teacher_dominates,
`dadpo inspect --beta2` and train's first-step warning, against hand computations on the tiny cache."""

from __future__ import annotations

import math
import re

import polars as pl
import pytest
import torch

from dadpo.loss import TEACHER_DOMINANCE, teacher_dominates, teacher_term_scale, term_sizes
from dadpo.recipes.dadpo import TrainConfig, train
from support import assert_one_line_error, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def hand_median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def softplus(x: float) -> float:  # -log sigmoid(-x), written out
    return math.log(1 + math.exp(x)) if x < 30 else x + math.log1p(math.exp(-x))


@pytest.fixture(scope="module")
def margins(cache_dir) -> tuple[list[float], list[float]]:
    """(h_ref, h_te) per cached pair, read from the shards with plain Python."""
    rows = pl.concat([pl.read_parquet(f) for f in sorted((cache_dir / "shards").glob("*.parquet"))]).to_dicts()
    return ([r["ref_logp_chosen"] - r["ref_logp_rejected"] for r in rows],
            [r["teacher_logp_chosen"] - r["teacher_logp_rejected"] for r in rows])


def test_scale_by_hand():
    # gaps h_ref - h_te: -100, 0, -4 (the nan pair is left out); |gap| median 4
    scale = teacher_term_scale([0.0, 10.0, -3.0, math.nan], [100.0, 10.0, 1.0, 2.0], beta2=0.1)
    assert scale.pairs == 3 and scale.median_gap == 4.0 and scale.beta2_for_unit == 0.25
    assert scale.median_term == pytest.approx(0.4)
    assert scale.start_loss == pytest.approx((softplus(10.0) + math.log(2) + softplus(0.4)) / 3)
    assert teacher_term_scale([1.0, 2.0], [1.0, 2.0]).beta2_for_unit == math.inf  # no gap: any beta2
    assert teacher_term_scale([1.0], [3.0]).median_term is None
    with pytest.raises(Exception, match="1-D of one length"):
        teacher_term_scale([1.0, 2.0], [1.0])


def test_term_sizes_and_the_rule_by_hand():
    h_policy, h_ref, h_te = (torch.tensor(v, dtype=torch.float64) for v in ([2.0, -5.0], [0.5, -2.0], [15.0, 32.0]))
    reference, teacher = term_sizes(h_policy, h_ref, h_te, beta1=0.1, beta2=0.5)
    assert reference == pytest.approx((0.1 * 1.5 + 0.1 * 3) / 2)
    assert teacher == pytest.approx((0.5 * 13 + 0.5 * 37) / 2)
    assert TEACHER_DOMINANCE == 5.0
    assert not teacher_dominates(0.0, 5.0) and teacher_dominates(0.0, 5.01)  # floor of 1
    assert not teacher_dominates(3.0, 15.0) and teacher_dominates(3.0, 15.1)  # 5 x the reference term


def test_scale_of_the_tiny_cache(margins):
    h_ref, h_te = margins
    scale = teacher_term_scale(h_ref, h_te, beta2=0.3)
    gap = hand_median([abs(r - t) for r, t in zip(h_ref, h_te)])
    assert scale.pairs == len(h_ref) == 40
    assert scale.median_gap == pytest.approx(gap, rel=1e-12) and scale.beta2_for_unit == pytest.approx(1 / gap)
    assert scale.median_term == pytest.approx(0.3 * gap)
    assert scale.start_loss == pytest.approx(sum(softplus(-0.3 * (r - t)) for r, t in zip(h_ref, h_te)) / 40)


def test_cli_inspect_beta2(cache_dir, margins):
    h_ref, h_te = margins
    gap = hand_median([abs(r - t) for r, t in zip(h_ref, h_te)])
    beta2 = 3 / gap  # the median pair's teacher term is 3: above 1
    result = run_cli("inspect", cache_dir, "--beta2", beta2)
    assert result.returncode == 0, result.stderr
    found = re.search(r"median \|h_ref - h_te\| = (\S+) nats; beta2 = (\S+) keeps \|beta2\*\(h_ref - h_te\)\| near 1",
                      result.stdout)
    assert found, result.stdout
    assert float(found[1]) == pytest.approx(gap, rel=5e-3) and float(found[2]) == pytest.approx(1 / gap, rel=5e-3)
    found = re.search(r"with beta2 = \S+: median \|beta2\*\(h_ref - h_te\)\| = (\S+), step-0 loss (\S+) \(above 1",
                      result.stdout)
    assert found, result.stdout
    start_loss = sum(softplus(-beta2 * (r - t)) for r, t in zip(h_ref, h_te)) / len(h_ref)
    assert float(found[1]) == pytest.approx(3.0, rel=5e-3) and float(found[2]) == pytest.approx(start_loss, rel=5e-3)
    quiet = run_cli("inspect", cache_dir)  # without --beta2: the beta2 for the median pair only
    assert "keeps |beta2*(h_ref - h_te)| near 1" in quiet.stdout and "step-0 loss" not in quiet.stdout
    assert_one_line_error(run_cli("inspect", cache_dir, "--beta2", "-1"), "--beta2 -1", ">= 0")


def first_step(cache_dir, tmp_path, capsys, model, beta1: float, beta2: float) -> str:
    """One step over all 40 pairs (one batch, nothing held out); what train printed."""
    capsys.readouterr()
    train(TrainConfig(cache=str(cache_dir), out=str(tmp_path / f"run-{beta1}-{beta2}"), model=model, beta1=beta1,
                      beta2=beta2, batch_size=40, grad_accum=1, max_steps=1, eval_fraction=0.0, start_check=0,
                      progress=False))
    return capsys.readouterr().out


def test_train_warns_when_the_teacher_term_dominates(cache_dir, models, margins, tmp_path, capsys):
    h_ref, h_te = margins
    mean_gap = sum(abs(r - t) for r, t in zip(h_ref, h_te)) / len(h_ref)
    # the policy starts as the reference: h_policy = h_ref (up to the cache's drift), so the
    # reference term is ~0 and the teacher term is beta2 * mean |h_ref - h_te|
    out = first_step(cache_dir, tmp_path, capsys, None, beta1=0.1, beta2=10 / mean_gap)
    lines = [line for line in out.splitlines() if line.startswith("warning: the teacher term dominates")]
    assert len(lines) == 1, out
    teacher = float(re.search(r"mean \|beta2\*\(h_policy - h_teacher\)\| = (\S+) >", lines[0])[1])
    reference = float(re.search(r"mean \|beta1\*\(h_policy - h_ref\)\| = (\S+), 1\)", lines[0])[1])
    assert teacher == pytest.approx(10.0, rel=1e-2) and reference < 1e-3
    unit = float(re.search(r"--beta2 (\S+) keeps it near 1", lines[0])[1])
    assert unit == pytest.approx(1 / hand_median([abs(r - t) for r, t in zip(h_ref, h_te)]), rel=1e-2)
    # teacher term 4: below 5 x the floor of 1
    assert "warning: the teacher term" not in first_step(cache_dir, tmp_path, capsys, None, beta1=0.1,
                                                         beta2=4 / mean_gap)
    # another policy and a large beta1: the reference term is large, so the same teacher term does not dominate
    assert "warning: the teacher term" not in first_step(cache_dir, tmp_path, capsys, str(models["student_b"]),
                                                         beta1=1000.0, beta2=10 / mean_gap)
