import math

import pytest
import torch
import torch.nn.functional as F

from dadpo.errors import DadpoError
from dadpo.loss import METRIC_NAMES, dadpo_loss, loss_metrics, metric_sums

# Two hand-made pairs: (policy_c, policy_r, ref_c, ref_r, teacher_c, teacher_r).
PAIRS = [(-10.0, -12.0, -11.0, -11.5, -5.0, -20.0),
         (-30.0, -25.0, -28.0, -26.0, -8.0, -40.0)]


def as_tensors(pairs, dtype=torch.float64):
    return [torch.tensor(column, dtype=dtype) for column in zip(*pairs)]


def standard_dpo(policy_c, policy_r, ref_c, ref_r, beta):
    # Textbook DPO sigmoid loss, written independently of dadpo_loss.
    return -F.logsigmoid(beta * ((policy_c - ref_c) - (policy_r - ref_r)))


def random_logps(batch, seed, requires_grad=False):
    generator = torch.Generator().manual_seed(seed)
    logps = [-50 * torch.rand(batch, generator=generator, dtype=torch.float64) for _ in range(6)]
    for tensor in logps[:2]:
        tensor.requires_grad_(requires_grad)
    return logps


def test_hand_computed_values():
    out = dadpo_loss(*as_tensors(PAIRS), beta1=0.1, beta2=0.01)
    # pair 0: h_policy = 2, h_ref = 0.5, h_teacher = 15
    u0 = 0.1 * (2 - 0.5) + 0.01 * (2 - 15)
    # pair 1: h_policy = -5, h_ref = -2, h_teacher = 32
    u1 = 0.1 * (-5 - (-2)) + 0.01 * (-5 - 32)
    expected_losses = [math.log(1 + math.exp(-u0)), math.log(1 + math.exp(-u1))]
    assert torch.allclose(out.margins, torch.tensor([u0, u1], dtype=torch.float64))
    assert torch.allclose(out.losses, torch.tensor(expected_losses, dtype=torch.float64))
    chosen0 = 0.1 * (-10 - (-11)) + 0.01 * (-10 - (-5))
    rejected0 = 0.1 * (-12 - (-11.5)) + 0.01 * (-12 - (-20))
    assert out.chosen_rewards[0].item() == pytest.approx(chosen0)
    assert out.rejected_rewards[0].item() == pytest.approx(rejected0)
    assert out.losses.dtype == torch.float64


def test_beta2_zero_is_standard_dpo():
    policy_c, policy_r, ref_c, ref_r, teacher_c, teacher_r = random_logps(16, seed=0)
    out = dadpo_loss(policy_c, policy_r, ref_c, ref_r, teacher_c, teacher_r, beta1=0.3, beta2=0.0)
    assert torch.allclose(out.losses, standard_dpo(policy_c, policy_r, ref_c, ref_r, 0.3))


def test_beta1_zero_is_dpo_with_teacher_as_reference():
    policy_c, policy_r, ref_c, ref_r, teacher_c, teacher_r = random_logps(16, seed=1)
    out = dadpo_loss(policy_c, policy_r, ref_c, ref_r, teacher_c, teacher_r, beta1=0.0, beta2=0.05)
    assert torch.allclose(out.losses, standard_dpo(policy_c, policy_r, teacher_c, teacher_r, 0.05))


def test_gradients_match_closed_form():
    beta1, beta2 = 0.2, 0.07
    logps = random_logps(32, seed=2, requires_grad=True)
    out = dadpo_loss(*logps, beta1=beta1, beta2=beta2)
    out.losses.sum().backward()
    # d(-log sigmoid(u))/du = -sigmoid(-u), and du/d(policy_c) = beta1 + beta2 = -du/d(policy_r).
    expected = -(beta1 + beta2) * torch.sigmoid(-out.margins)
    assert torch.allclose(logps[0].grad, expected, rtol=1e-12, atol=1e-14)
    assert torch.allclose(logps[1].grad, -expected, rtol=1e-12, atol=1e-14)
    assert not out.margins.requires_grad and not out.chosen_rewards.requires_grad


def test_metrics_on_hand_example():
    out = dadpo_loss(*as_tensors(PAIRS), beta1=0.1, beta2=0.01)
    metrics = loss_metrics(out)
    assert set(metrics) == set(METRIC_NAMES)
    u0, u1 = 0.1 * 1.5 + 0.01 * -13, 0.1 * -3 + 0.01 * -37  # u0 = 0.02 > 0, u1 = -0.67 < 0
    assert metrics["reward_accuracy"] == pytest.approx(0.5)
    assert metrics["margin"] == pytest.approx((u0 + u1) / 2)
    assert metrics["chosen_reward"] - metrics["rejected_reward"] == pytest.approx(metrics["margin"])
    assert torch.allclose(out.chosen_rewards - out.rejected_rewards, out.margins)
    assert metrics["h_policy"] == pytest.approx((2 + -5) / 2)
    assert metrics["h_ref"] == pytest.approx((0.5 + -2) / 2)
    assert metrics["h_teacher"] == pytest.approx((15 + 32) / 2)
    assert metrics["loss"] == pytest.approx(out.losses.mean().item())


def test_metric_sums_aggregate_across_micro_batches():
    logps = random_logps(10, seed=3)
    whole = loss_metrics(dadpo_loss(*logps, beta1=0.1, beta2=0.1))
    first = metric_sums(dadpo_loss(*[t[:3] for t in logps], beta1=0.1, beta2=0.1))
    second = metric_sums(dadpo_loss(*[t[3:] for t in logps], beta1=0.1, beta2=0.1))
    total = {name: first[name] + second[name] for name in first}
    assert total["count"] == 10
    for name in METRIC_NAMES:
        assert total[name] / total["count"] == pytest.approx(whole[name])


@pytest.mark.parametrize("beta1, beta2, message", [
    (0.0, 0.0, "beta1 and beta2 are both 0"), (-0.1, 0.1, "beta1"), (0.1, -0.5, "beta2"),
    (float("nan"), 0.1, "beta1")])
def test_bad_betas_raise(beta1, beta2, message):
    with pytest.raises(DadpoError, match=message):
        dadpo_loss(*as_tensors(PAIRS), beta1=beta1, beta2=beta2)


def test_mismatched_shapes_raise():
    logps = as_tensors(PAIRS)
    logps[3] = logps[3][:1]
    with pytest.raises(DadpoError, match="same shape"):
        dadpo_loss(*logps, beta1=0.1, beta2=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huge_margins_are_finite(dtype):
    # h_policy = +-1e4 with beta1 = 1 gives u = +-1e4: sigmoid saturates in both directions.
    policy_c = torch.tensor([0.0, -1e4], dtype=dtype, requires_grad=True)
    policy_r = torch.tensor([-1e4, 0.0], dtype=dtype, requires_grad=True)
    zeros = torch.zeros(2, dtype=dtype)
    out = dadpo_loss(policy_c, policy_r, zeros, zeros, zeros, zeros, beta1=1.0, beta2=0.0)
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all()
    assert out.losses[0].item() == pytest.approx(0.0, abs=1e-6)
    assert out.losses[1].item() == pytest.approx(1e4)
    assert torch.isfinite(policy_c.grad).all() and torch.isfinite(policy_r.grad).all()
    assert policy_c.grad.tolist() == pytest.approx([0.0, -1.0], abs=1e-6)


def test_bfloat16_policy_is_computed_in_float32():
    logps = as_tensors(PAIRS, dtype=torch.bfloat16)
    out = dadpo_loss(*logps, beta1=0.1, beta2=0.01)
    assert out.losses.dtype == torch.float32
