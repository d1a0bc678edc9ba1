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

import numpy as np
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


# ---------------------------------------------------------------- how big the teacher term is

# train warns when the first step's teacher term is this many times the larger of the reference
# term and 1 (see teacher_dominates).
TEACHER_DOMINANCE = 5.0


@dataclass(frozen=True)
class TeacherTermScale:
    """How big the teacher term is at the start of training, over a set of pairs (teacher_term_scale)."""

    pairs: int  # pairs with finite margins
    median_gap: float  # median over pairs of |h_ref - h_te| (nats)
    beta2_for_unit: float  # 1 / median_gap: the beta2 with |beta2 * (h_ref - h_te)| = 1 for the median pair
    beta2: float | None  # the beta2 asked about, if any; then:
    median_term: float | None  # median over pairs of |beta2 * (h_ref - h_te)| = beta2 * median_gap
    start_loss: float | None  # mean over pairs of -log sigmoid(beta2 * (h_ref - h_te)): step 0's loss


def teacher_term_scale(h_ref, h_teacher, beta2: float | None = None) -> TeacherTermScale:
    """The size of the teacher term where training starts, from a cache's margins alone.

    Training starts from the reference (h_policy = h_ref), so there the reference term is 0 and

        u_i = beta2 * (h_ref,i - h_te,i)                  per pair i
        median_gap     = median_i |h_ref,i - h_te,i|
        beta2_for_unit = 1 / median_gap                    (|u| = 1 for the median pair)
        median_term    = median_i |beta2 * (h_ref,i - h_te,i)| = beta2 * median_gap
        start_loss     = mean_i -log sigmoid(beta2 * (h_ref,i - h_te,i))

    Where |u| >> 1 the loss is ~|u| and the sigmoid is saturated: every pair gets the same gradient
    weight and the teacher term swamps the reference term. h_ref, h_teacher: 1-D arrays or tensors
    (pairs whose margins are not finite are left out); beta2=None gives only the first two numbers.
    """
    h_ref = np.asarray(h_ref, dtype=np.float64)
    h_teacher = np.asarray(h_teacher, dtype=np.float64)
    if h_ref.shape != h_teacher.shape or h_ref.ndim != 1:
        raise DadpoError(f"teacher_term_scale: h_ref and h_teacher must be 1-D of one length, got "
                         f"{h_ref.shape} and {h_teacher.shape}")
    gap = h_ref - h_teacher
    gap = gap[np.isfinite(gap)]
    median_gap = float(np.median(np.abs(gap))) if gap.size else math.nan
    beta2_for_unit = (1.0 / median_gap if median_gap > 0 else math.inf) if gap.size else math.nan
    median_term = start_loss = None
    if beta2 is not None:
        median_term = beta2 * median_gap
        start_loss = float(np.mean(np.logaddexp(0.0, -beta2 * gap))) if gap.size else math.nan  # -log sigmoid(x)
    return TeacherTermScale(int(gap.size), median_gap, beta2_for_unit, beta2, median_term, start_loss)


def term_sizes(h_policy: torch.Tensor, h_ref: torch.Tensor, h_teacher: torch.Tensor, beta1: float,
               beta2: float) -> tuple[float, float]:
    """(reference term, teacher term): the means over pairs of the sizes of u's two parts,

        reference term = mean_i |beta1 * (h_policy,i - h_ref,i)|
        teacher term   = mean_i |beta2 * (h_policy,i - h_teacher,i)|
    """
    h_policy, h_ref, h_teacher = (t.detach().double() for t in (h_policy, h_ref, h_teacher))
    return (float((beta1 * (h_policy - h_ref)).abs().mean()), float((beta2 * (h_policy - h_teacher)).abs().mean()))


def teacher_dominates(reference_term: float, teacher_term: float) -> bool:
    """The rule train warns by: teacher term > TEACHER_DOMINANCE * max(reference term, 1).

    The floor of 1 is the sigmoid's own scale: at step 0 the policy is the reference, so the
    reference term is ~0 and a teacher term below a few nats still leaves the loss informative;
    above it the loss is ~|u| and the pairs no longer weigh differently.
    """
    return teacher_term > TEACHER_DOMINANCE * max(reference_term, 1.0)
