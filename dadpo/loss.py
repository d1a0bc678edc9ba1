"""The daDPO objective (arXiv 2506.15717) as a pure function on per-pair sentence log-probs.

Each pair has a prompt x, a teacher response y_t (`chosen`) and a student response y_s
(`rejected`). log M(y|x) is the SUM of the response's token log-probs under model M, and

    h_M = log M(y_t|x) - log M(y_s|x)
    u   = beta1 * (h_policy - h_ref) + beta2 * (h_policy - h_teacher)
    loss = -log sigmoid(u)            (per pair; the caller takes the mean)

policy = the student being trained, ref = the frozen dSFT student, teacher = the frozen teacher.
beta2 = 0 is plain DPO (dDPO); beta1 = 0 is DPO with the teacher as the reference (rDPO).

Several teachers: log teacher(y) is their weighted mean sum_k w_k log teacher_k(y) (weights summing
to 1). That is the log of the geometric mixture prod_k teacher_k(y)^w_k, up to its normaliser, which
is the same for y_t and y_s and so cancels in h_teacher: the paper's derivation, with one reference
distribution, goes through unchanged with the mixture in the teacher's place. The caller (the daDPO
recipe) forms that mean; this function takes the one teacher log-prob it gives.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dadpo.errors import DadpoError

# Keys of loss_metrics / metric_sums (metric_sums adds "count").
METRIC_NAMES = ("loss", "margin", "reward_accuracy", "chosen_reward", "rejected_reward",
                "h_policy", "h_ref", "h_teacher")


@dataclass
class LossOutput:
    """Per-pair results, all shape [B]. Only `losses` carries grad; the rest are detached.

    Implicit rewards (log-ratios against both frozen models, weighted by the betas):
        chosen_reward   = beta1 * (log pi(y_t) - log ref(y_t)) + beta2 * (log pi(y_t) - log te(y_t))
        rejected_reward = beta1 * (log pi(y_s) - log ref(y_s)) + beta2 * (log pi(y_s) - log te(y_s))
    so chosen_reward - rejected_reward = margin = u (up to float rounding).
    """

    losses: torch.Tensor  # -log sigmoid(u)
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    margins: torch.Tensor  # u, the argument of the sigmoid
    h_policy: torch.Tensor
    h_ref: torch.Tensor
    h_teacher: torch.Tensor


def check_betas(beta1: float, beta2: float) -> None:
    """Raise DadpoError unless both betas are finite, non-negative and not both zero."""
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if not math.isfinite(beta) or beta < 0:
            raise DadpoError(f"{name} must be a finite number >= 0, got {beta}")
    if beta1 == 0 and beta2 == 0:
        raise DadpoError("beta1 and beta2 are both 0: the loss would be constant; "
                         "set beta1 > 0 (DPO against the dSFT reference) and/or beta2 > 0 "
                         "(against the teacher)")


def dadpo_loss(policy_logp_chosen: torch.Tensor, policy_logp_rejected: torch.Tensor,
               ref_logp_chosen: torch.Tensor, ref_logp_rejected: torch.Tensor,
               teacher_logp_chosen: torch.Tensor, teacher_logp_rejected: torch.Tensor,
               beta1: float, beta2: float) -> LossOutput:
    """Per-pair daDPO loss: -log sigmoid(beta1*(h_policy - h_ref) + beta2*(h_policy - h_teacher)).

    All six inputs are [B] sentence log-probs; ref/teacher are treated as constants (detached).
    Computation dtype is the promotion of all six input dtypes with float32, so bf16/fp16
    policies are computed (and returned) in float32 and float64 inputs stay float64.
    """
    check_betas(beta1, beta2)
    inputs = (policy_logp_chosen, policy_logp_rejected, ref_logp_chosen, ref_logp_rejected,
              teacher_logp_chosen, teacher_logp_rejected)
    shape = policy_logp_chosen.shape
    if len(shape) != 1 or any(t.shape != shape for t in inputs):
        raise DadpoError(f"log-prob tensors must all have the same shape [B], got "
                         f"{[tuple(t.shape) for t in inputs]}")
    dtype = torch.float32
    for tensor in inputs:
        dtype = torch.promote_types(dtype, tensor.dtype)
    policy_c, policy_r = policy_logp_chosen.to(dtype), policy_logp_rejected.to(dtype)
    ref_c, ref_r, teacher_c, teacher_r = (t.detach().to(dtype) for t in inputs[2:])

    h_policy = policy_c - policy_r
    h_ref = ref_c - ref_r
    h_teacher = teacher_c - teacher_r
    margins = beta1 * (h_policy - h_ref) + beta2 * (h_policy - h_teacher)
    # logsigmoid stays finite for huge |u| where log(sigmoid(u)) would underflow to log(0).
    losses = -F.logsigmoid(margins)

    with torch.no_grad():
        chosen_rewards = beta1 * (policy_c - ref_c) + beta2 * (policy_c - teacher_c)
        rejected_rewards = beta1 * (policy_r - ref_r) + beta2 * (policy_r - teacher_r)
    return LossOutput(losses=losses, chosen_rewards=chosen_rewards.detach(),
                      rejected_rewards=rejected_rewards.detach(), margins=margins.detach(),
                      h_policy=h_policy.detach(), h_ref=h_ref, h_teacher=h_teacher)


def metric_sums(out: LossOutput) -> dict[str, float]:
    """Sums over the batch of each METRIC_NAMES value, plus "count" (number of pairs).

    For aggregating over micro-batches and processes: add the dicts up, then divide by count.
    """
    per_pair = {
        "loss": out.losses.detach(), "margin": out.margins,
        "reward_accuracy": (out.margins > 0).to(out.margins.dtype),  # chosen reward > rejected
        "chosen_reward": out.chosen_rewards, "rejected_reward": out.rejected_rewards,
        "h_policy": out.h_policy, "h_ref": out.h_ref, "h_teacher": out.h_teacher,
    }
    sums = {name: float(values.double().sum()) for name, values in per_pair.items()}
    sums["count"] = float(out.losses.numel())
    return sums


def loss_metrics(out: LossOutput) -> dict[str, float]:
    """Batch means of METRIC_NAMES (loss, margin, reward_accuracy, rewards, h_*)."""
    sums = metric_sums(out)
    count = sums.pop("count")
    if count == 0:
        raise DadpoError("loss_metrics got an empty batch")
    return {name: total / count for name, total in sums.items()}
