"""Pairwise preference losses on per-example log-probabilities, and a registry of them.

Every loss takes four tensors of shape ``(B,)`` (policy and reference log-probabilities of
the chosen and the rejected response) plus ``beta`` and returns per-example losses of shape
``(B,)``. Most losses are functions of the scaled log-ratio margin

    rho = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    z   = beta * rho

Losses found later by the discovery loop are registered with
:func:`register_preference_loss`, or saved as JSON ``{"name", "code"}`` and loaded with
:func:`load_preference_loss`. A loaded loss never runs in this process: its code is checked
against the allow-list of :mod:`mmalign.loops.sandbox`, validated in the sandbox worker, and
every later call evaluates it in that worker through :class:`SandboxedPreferenceLoss`.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from mmalign.loops.sandbox import SIGNATURE, Sandbox, check_proposal, default_sandbox

logger = logging.getLogger("mmalign.loops")

PreferenceLossFn = Callable[..., Tensor]
"""``fn(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
reference_rejected_logps, beta, **params) -> Tensor[B]``."""

_LOSS_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def _margin(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
) -> Tensor:
    """Return rho, the policy log-ratio margin minus the reference one. Shape ``(B,)``."""
    policy_margin = policy_chosen_logps - policy_rejected_logps
    reference_margin = reference_chosen_logps - reference_rejected_logps
    return policy_margin - reference_margin


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Compute the sigmoid DPO loss ``-log sigmoid(z)`` per example.

    DPO: Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is
    Secretly a Reward Model". With ``label_smoothing = eps > 0`` the loss is
    ``-(1 - eps) log sigmoid(z) - eps log sigmoid(-z)``, which treats each label as flipped
    with probability ``eps``.

    Args:
        policy_chosen_logps: Policy log-probabilities of the chosen responses, shape ``(B,)``.
        policy_rejected_logps: Policy log-probabilities of the rejected responses, ``(B,)``.
        reference_chosen_logps: Reference log-probabilities of the chosen responses, ``(B,)``.
        reference_rejected_logps: Reference log-probabilities of the rejected responses, ``(B,)``.
        beta: Scale of the log-ratio margin.
        label_smoothing: Probability ``eps`` in ``[0, 0.5]`` that a label is flipped.

    Returns:
        Per-example losses, shape ``(B,)``.

    Raises:
        ValueError: If ``label_smoothing`` is outside ``[0, 0.5]``.
    """
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    z = beta * _margin(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    losses = -F.logsigmoid(z)
    if label_smoothing > 0.0:
        losses = (1.0 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-z)
    return losses


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float = 0.1,
) -> Tensor:
    """Compute the IPO loss ``(rho - 1 / (2 beta))^2`` per example.

    IPO: Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences". Here ``beta`` is the regularization strength the paper calls tau. The margin
    is not divided by the completion length, unlike TRL's ``ipo`` option.

    Args and shapes are those of :func:`dpo_loss`.
    """
    rho = _margin(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    return (rho - 1.0 / (2.0 * beta)) ** 2


def hinge_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float = 0.1,
) -> Tensor:
    """Compute the hinge loss ``relu(1 - z)`` per example.

    This is the form of the ``hinge`` option in TRL 1.16's ``DPOTrainer``. Args and shapes are
    those of :func:`dpo_loss`.
    """
    z = beta * _margin(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    return torch.relu(1.0 - z)


def discopop_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float = 0.05,
    tau: float = 0.05,
) -> Tensor:
    """Compute the DiscoPOP (log-ratio modulated) loss per example.

    DiscoPOP: Lu et al. 2024, "Discovering Preference Optimization Algorithms with and for
    Large Language Models", arXiv 2406.08414. With ``w = sigmoid(z / tau)`` the loss is
    ``(1 - w) * (-log sigmoid(z)) + w * exp(-z)``.

    The second term is computed as ``exp(log sigmoid(z / tau) - z)``. For large negative
    ``z`` the weight ``w`` underflows to 0 and ``exp(-z)`` overflows, so the plain product
    would give ``0 * inf = nan`` there, while this form stays finite.

    Args:
        tau: Temperature of the mixing weight ``w``.

    Other args and shapes are those of :func:`dpo_loss`.
    """
    z = beta * _margin(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    logistic_weight = torch.sigmoid(-z / tau)  # 1 - sigmoid(z / tau)
    logistic_term = -F.logsigmoid(z)
    exponential_term = torch.exp(F.logsigmoid(z / tau) - z)  # sigmoid(z / tau) * exp(-z)
    return logistic_weight * logistic_term + exponential_term


def cell_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float = 0.05,
) -> Tensor:
    """Compute the CELL loss ``0.5 exp(-z) + 0.5 (-log sigmoid(z))`` per example.

    CELL (mean of the exponential and the logistic loss): Lu et al. 2024, arXiv 2406.08414.
    The exponential term grows without bound as ``z`` falls, so the loss overflows to ``inf``
    for ``z`` below about -88 in float32 and -709 in float64. Args and shapes are those of
    :func:`dpo_loss`.
    """
    z = beta * _margin(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    return 0.5 * torch.exp(-z) - 0.5 * F.logsigmoid(z)


def padll_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float = 0.05,
) -> Tensor:
    """Compute the PADLL loss ``0.9 (1 - 0.5 [rho < 0]) (-log sigmoid(z))`` per example.

    PADLL: Lu et al. 2024, arXiv 2406.08414. The weight halves the logistic loss of pairs the
    policy ranks the wrong way round (``rho < 0``). It is a step function of ``rho``, so no
    gradient flows through it. Args and shapes are those of :func:`dpo_loss`.
    """
    rho = _margin(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    weight = 0.9 * (1.0 - 0.5 * (rho < 0).to(rho.dtype))
    return -weight * F.logsigmoid(beta * rho)


@dataclass(frozen=True)
class LossSpec:
    """A registered preference loss: its function, default ``beta`` and extra parameters.

    Attributes:
        name: Registry key.
        fn: ``fn(pc, pr, rc, rr, beta, **params) -> Tensor[B]``.
        default_beta: ``beta`` used when the caller gives none.
        params: Extra keyword parameters of ``fn`` with their defaults.
        reference: Paper or origin of the loss.
    """

    name: str
    fn: PreferenceLossFn
    default_beta: float = 0.1
    params: Mapping[str, float] = field(default_factory=dict)
    reference: str = ""

    def bind(self, **params: float) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
        """Return ``fn`` with ``beta`` and the extra parameters fixed.

        Raises:
            ValueError: If a parameter is not ``beta`` or one of ``params``.
        """
        accepted = ["beta", *self.params]
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            raise ValueError(f"invalid parameter(s) {unknown} for preference loss {self.name!r}; accepted: {accepted}")
        bound = {"beta": self.default_beta, **self.params, **params}
        return functools.partial(self.fn, **bound)


PREFERENCE_LOSSES: dict[str, LossSpec] = {
    "dpo": LossSpec("dpo", dpo_loss, 0.1, {"label_smoothing": 0.0}, "Rafailov et al. 2023"),
    "ipo": LossSpec("ipo", ipo_loss, 0.1, {}, "Azar et al. 2023"),
    "hinge": LossSpec("hinge", hinge_loss, 0.1, {}, "hinge option of TRL's DPOTrainer"),
    # NOTE: CELL and PADLL reuse DiscoPOP's default beta of 0.05; that value is not checked
    # against the settings Lu et al. 2024 used for these two losses.
    "discopop": LossSpec("discopop", discopop_loss, 0.05, {"tau": 0.05}, "Lu et al. 2024, arXiv 2406.08414"),
    "cell": LossSpec("cell", cell_loss, 0.05, {}, "Lu et al. 2024, arXiv 2406.08414"),
    "padll": LossSpec("padll", padll_loss, 0.05, {}, "Lu et al. 2024, arXiv 2406.08414"),
}


def get_preference_loss(name: str, **params: float) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """Look up a registered loss and bind its parameters.

    Args:
        name: Registry key, for example ``"dpo"`` or ``"discopop"``.
        **params: ``beta`` and the loss's extra parameters; missing ones take their defaults.

    Returns:
        ``loss(pc, pr, rc, rr) -> Tensor[B]``.

    Raises:
        ValueError: If ``name`` is not registered or a parameter is not accepted.
    """
    spec = PREFERENCE_LOSSES.get(name)
    if spec is None:
        raise ValueError(f"preference loss {name!r} not supported; accepted names: {sorted(PREFERENCE_LOSSES)}")
    return spec.bind(**params)


def register_preference_loss(
    name: str,
    fn: PreferenceLossFn,
    *,
    default_beta: float = 0.1,
    params: Mapping[str, float] | None = None,
    reference: str = "",
    overwrite: bool = False,
) -> LossSpec:
    """Add a loss to :data:`PREFERENCE_LOSSES`.

    Args:
        name: Registry key: lower-case letters, digits and underscores, starting with a letter.
        fn: ``fn(pc, pr, rc, rr, beta, **params) -> Tensor[B]``.
        default_beta: ``beta`` used when the caller gives none.
        params: Extra keyword parameters of ``fn`` with their defaults.
        reference: Paper or origin of the loss.
        overwrite: Replace an existing entry of the same name instead of raising.

    Returns:
        The registered spec.

    Raises:
        ValueError: If ``name`` is invalid, or already registered and ``overwrite`` is False.
    """
    if not _LOSS_NAME.match(name):
        raise ValueError(f"invalid loss name {name!r}: use lower-case letters, digits and '_', starting with a letter")
    if name in PREFERENCE_LOSSES and not overwrite:
        raise ValueError(f"preference loss {name!r} is already registered; pass overwrite=True to replace it")
    spec = LossSpec(name, fn, default_beta, dict(params or {}), reference)
    PREFERENCE_LOSSES[name] = spec
    logger.info("registered preference loss %r (%s)", name, reference or "no reference")
    return spec


def save_preference_loss(path: str | Path, name: str, code: str) -> None:
    """Write a discovered loss as JSON ``{"name", "code"}`` after the static allow-list check.

    Raises:
        ValueError: If ``name`` is invalid or ``code`` fails the static check.
    """
    if not _LOSS_NAME.match(name):
        raise ValueError(f"invalid loss name {name!r}: use lower-case letters, digits and '_', starting with a letter")
    violations = check_proposal(code)
    if violations:
        raise ValueError(f"loss {name!r} not saved, the static check failed: {violations}")
    Path(path).write_text(json.dumps({"name": name, "code": code}, indent=2) + "\n", encoding="utf-8")


def load_preference_loss(
    path: str | Path,
    *,
    sandbox: Sandbox | None = None,
    default_beta: float = 0.1,
    overwrite: bool = False,
) -> LossSpec:
    """Validate a saved loss in the sandbox and register it.

    The code is checked against the sandbox allow-list and validated on random inputs in the
    sandbox worker. The registered function evaluates the code in that worker on every call,
    so the code never runs in this process.

    Args:
        path: JSON file with string fields ``name`` and ``code``.
        sandbox: Worker to validate and evaluate in; the shared default worker if None.
        default_beta: ``beta`` used when the caller gives none.
        overwrite: Replace an existing entry of the same name instead of raising.

    Returns:
        The registered spec.

    Raises:
        ValueError: If the file is not such a JSON object, or the code fails validation.
    """
    record = json.loads(Path(path).read_text(encoding="utf-8"))
    if (
        not isinstance(record, dict)
        or not isinstance(record.get("name"), str)
        or not isinstance(record.get("code"), str)
    ):
        raise ValueError(f"{path}: expected a JSON object with string fields 'name' and 'code'")
    sandbox = sandbox if sandbox is not None else default_sandbox()
    result = sandbox.validate(record["code"], beta=default_beta)
    if not result.ok:
        raise ValueError(
            f"{path}: loss {record['name']!r} failed sandbox validation ({result.category}): {result.reason}"
        )
    fn = SandboxedPreferenceLoss(record["code"], sandbox=sandbox)
    return register_preference_loss(
        record["name"], fn, default_beta=default_beta, reference=f"discovered, loaded from {path}", overwrite=overwrite
    )


class SandboxedPreferenceLoss:
    """A preference-loss callable whose code runs only in the sandbox worker.

    Calling it returns per-example losses that are connected to the autograd graph of the
    policy log-probabilities, so ``loss(...).mean().backward()`` works as with the built-in
    losses. No gradient flows to the reference inputs.

    Raises:
        ValueError: At construction, if the code fails the static check.
        SandboxError: At a call or in backward, if the code fails in the worker.
    """

    def __init__(self, code: str, *, sandbox: Sandbox | None = None):
        """Check ``code`` statically; ``sandbox`` None means :func:`default_sandbox` at call time."""
        violations = check_proposal(code)
        if violations:
            raise ValueError(f"proposal code failed the static check: {violations}")
        self.code = code
        self.sandbox = sandbox

    def __call__(
        self,
        policy_chosen_logps: Tensor,
        policy_rejected_logps: Tensor,
        reference_chosen_logps: Tensor,
        reference_rejected_logps: Tensor,
        beta: float = 0.1,
    ) -> Tensor:
        return _SandboxedLossFunction.apply(
            policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta, self
        )

    def evaluate(
        self, logps: tuple[Tensor, ...], beta: float, weights: Tensor | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Run the code in the sandbox; see :meth:`mmalign.loops.sandbox.Sandbox.evaluate`."""
        sandbox = self.sandbox if self.sandbox is not None else default_sandbox()
        return sandbox.evaluate(self.code, dict(zip(SIGNATURE[:4], logps, strict=True)), beta=beta, weights=weights)


class _SandboxedLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, chosen, rejected, reference_chosen, reference_rejected, beta, loss):
        logps = (chosen, rejected, reference_chosen, reference_rejected)
        losses, (grad_chosen, grad_rejected) = loss.evaluate(logps, beta, None)
        ctx.save_for_backward(*logps, grad_chosen, grad_rejected)
        ctx.beta, ctx.loss = beta, loss
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        *logps, grad_chosen, grad_rejected = ctx.saved_tensors
        # The forward pass returned gradients of sum(losses). A uniform upstream gradient, as
        # from .mean() or .sum(), only rescales them. Any other needs a weighted re-run,
        # because a proposal may mix examples, for example through a batch mean.
        if torch.all(grad_losses == grad_losses[0]):
            scale = grad_losses[0]
            return scale * grad_chosen, scale * grad_rejected, None, None, None, None
        _, (grad_chosen, grad_rejected) = ctx.loss.evaluate(tuple(logps), ctx.beta, grad_losses)
        return grad_chosen, grad_rejected, None, None, None, None


def preference_reward_stats(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
) -> dict[str, float]:
    """Compute the implicit-reward metrics DPO-style trainers log.

    ``chosen_rewards = beta * (pc - rc)`` and ``rejected_rewards = beta * (pr - rr)``. A pair
    counts as correct when its chosen reward is strictly larger, so ties count as wrong.

    Returns:
        Batch means under the keys ``rewards/chosen``, ``rewards/rejected``,
        ``rewards/accuracy`` and ``rewards/margin``.
    """
    with torch.no_grad():
        chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps)  # [B]
        rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps)  # [B]
        margins = chosen_rewards - rejected_rewards
        accuracy = (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype)
    return {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracy": accuracy.mean().item(),
        "rewards/margin": margins.mean().item(),
    }
