"""Tests for mmalign.loops.losses: closed forms, stability at large margins, the registry, TRL parity."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from mmalign.loops.losses import (
    PREFERENCE_LOSSES,
    cell_loss,
    discopop_loss,
    dpo_loss,
    get_preference_loss,
    hinge_loss,
    ipo_loss,
    padll_loss,
    preference_reward_stats,
    register_preference_loss,
    save_preference_loss,
)

# rho = (pc - pr) - (rc - rr) = [2, 0, -5, -1]
POLICY_CHOSEN = [-10.0, -5.0, -20.0, -7.5]
POLICY_REJECTED = [-12.0, -5.0, -15.0, -7.5]
REFERENCE_CHOSEN = [-11.0, -6.0, -18.0, -7.0]
REFERENCE_REJECTED = [-11.0, -6.0, -18.0, -8.0]
RHO = [2.0, 0.0, -5.0, -1.0]


def logps(dtype=torch.float64, requires_grad=False):
    tensors = [
        torch.tensor(values, dtype=dtype)
        for values in (POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED)
    ]
    tensors[0].requires_grad_(requires_grad)
    tensors[1].requires_grad_(requires_grad)
    return tensors


def large_margin_logps(dtype, sign):
    """Logps with rho = sign * 10000, so that z = beta * rho = sign * 1000 at beta 0.1."""
    policy_chosen = torch.tensor([-10.0], dtype=dtype, requires_grad=True)
    policy_rejected = torch.tensor([-10.0 - sign * 10000.0], dtype=dtype, requires_grad=True)
    reference = torch.tensor([-10.0], dtype=dtype)
    return policy_chosen, policy_rejected, reference, reference.clone()


def log_sigmoid(z):
    """Scalar log sigmoid written out, valid for moderate z."""
    return -math.log1p(math.exp(-z))


def sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z))


def expected(formula, **params):
    return torch.tensor([formula(rho, **params) for rho in RHO], dtype=torch.float64)


@pytest.mark.parametrize(
    ("loss_fn", "params", "formula"),
    [
        (dpo_loss, {"beta": 0.1}, lambda rho, beta: -log_sigmoid(beta * rho)),
        (ipo_loss, {"beta": 0.1}, lambda rho, beta: (rho - 1 / (2 * beta)) ** 2),
        (hinge_loss, {"beta": 0.5}, lambda rho, beta: max(0.0, 1 - beta * rho)),
        (
            discopop_loss,
            {"beta": 0.5, "tau": 0.05},
            lambda rho, beta, tau: (
                (1 - sigmoid(beta * rho / tau)) * -log_sigmoid(beta * rho)
                + sigmoid(beta * rho / tau) * math.exp(-beta * rho)
            ),
        ),
        (cell_loss, {"beta": 0.5}, lambda rho, beta: 0.5 * math.exp(-beta * rho) - 0.5 * log_sigmoid(beta * rho)),
        (padll_loss, {"beta": 0.5}, lambda rho, beta: 0.9 * (1 - 0.5 * (rho < 0)) * -log_sigmoid(beta * rho)),
    ],
    ids=["dpo", "ipo", "hinge", "discopop", "cell", "padll"],
)
def test_loss_matches_formula(loss_fn, params, formula):
    result = loss_fn(*logps(), **params)
    assert result.shape == (4,)
    torch.testing.assert_close(result, expected(formula, **params), rtol=1e-12, atol=1e-12)


def test_losses_at_hand_computed_values():
    # rho = 0: DPO gives log 2; DiscoPOP mixes log 2 and exp(0) = 1 with weight 1/2.
    at_zero = [values[1:2] for values in logps()]
    assert dpo_loss(*at_zero).item() == pytest.approx(0.6931471805599453, abs=1e-15)
    assert discopop_loss(*at_zero).item() == pytest.approx(0.5 * 0.6931471805599453 + 0.5, abs=1e-15)
    assert cell_loss(*at_zero).item() == pytest.approx(0.5 + 0.5 * 0.6931471805599453, abs=1e-15)
    assert ipo_loss(*at_zero, beta=0.1).item() == pytest.approx(25.0)
    # rho = -5 at beta 0.1: PADLL halves the weight, 0.45 * -log sigmoid(-0.5) = 0.45 * 0.974076984...
    at_negative = [values[2:3] for values in logps()]
    assert padll_loss(*at_negative, beta=0.1).item() == pytest.approx(0.45 * 0.9740769841801067, abs=1e-12)


def test_dpo_label_smoothing_formula():
    eps = 0.1
    result = dpo_loss(*logps(), beta=0.1, label_smoothing=eps)
    formula = lambda rho: -(1 - eps) * log_sigmoid(0.1 * rho) - eps * log_sigmoid(-0.1 * rho)  # noqa: E731
    torch.testing.assert_close(result, expected(formula), rtol=1e-12, atol=1e-12)


def test_dpo_label_smoothing_out_of_range():
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*logps(), label_smoothing=0.7)


# Values at z = +1000 and z = -1000 (beta 0.1), where log(sigmoid(z)) or exp(-z) overflow.
LARGE_MARGIN_CASES = {
    # name: (value at z = +1000, value at z = -1000)
    "dpo": (0.0, 1000.0),
    "ipo": ((10000.0 - 5.0) ** 2, (-10000.0 - 5.0) ** 2),
    "hinge": (0.0, 1001.0),
    "discopop": (0.0, 1000.0),
    "cell": (0.0, math.inf),
    "padll": (0.0, 450.0),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(LARGE_MARGIN_CASES))
def test_loss_stable_at_large_margin(name, dtype):
    loss = get_preference_loss(name, beta=0.1)
    for sign, value in zip((1, -1), LARGE_MARGIN_CASES[name], strict=True):
        result = loss(*large_margin_logps(dtype, sign))
        assert not torch.isnan(result).any(), f"{name} gives nan at z = {sign * 1000}"
        assert result.item() == pytest.approx(value, rel=1e-6)


@pytest.mark.parametrize("name", sorted(LARGE_MARGIN_CASES))
def test_loss_gradients_finite(name):
    loss = get_preference_loss(name)
    inputs = logps(requires_grad=True)
    loss(*inputs).sum().backward()
    assert torch.isfinite(inputs[0].grad).all()
    assert torch.isfinite(inputs[1].grad).all()

    # CELL's exp(-z) overflows for large negative z, so its loss and gradient are inf there.
    signs = (1,) if name == "cell" else (1, -1)
    for sign in signs:
        chosen, rejected, *reference = large_margin_logps(torch.float32, sign)
        loss(chosen, rejected, *reference).sum().backward()
        assert torch.isfinite(chosen.grad).all(), f"{name} gradient at z = {sign * 1000}"
        assert torch.isfinite(rejected.grad).all(), f"{name} gradient at z = {sign * 1000}"


def test_registry_defaults():
    assert set(PREFERENCE_LOSSES) >= {"dpo", "ipo", "hinge", "discopop", "cell", "padll"}
    assert PREFERENCE_LOSSES["dpo"].default_beta == 0.1
    assert PREFERENCE_LOSSES["discopop"].default_beta == 0.05
    assert PREFERENCE_LOSSES["discopop"].params == {"tau": 0.05}
    torch.testing.assert_close(get_preference_loss("discopop")(*logps()), discopop_loss(*logps(), beta=0.05, tau=0.05))


def test_get_preference_loss_unknown_name():
    with pytest.raises(ValueError, match="accepted names: .*'discopop'.*'dpo'"):
        get_preference_loss("dpoo")


def test_get_preference_loss_unknown_parameter():
    with pytest.raises(ValueError, match="accepted: \\['beta', 'tau'\\]"):
        get_preference_loss("discopop", temperature=0.1)


def test_register_preference_loss_roundtrip():
    def doubled_dpo(pc, pr, rc, rr, beta, scale=2.0):
        return scale * dpo_loss(pc, pr, rc, rr, beta)

    try:
        register_preference_loss("doubled_dpo", doubled_dpo, params={"scale": 2.0}, reference="test")
        result = get_preference_loss("doubled_dpo", scale=3.0)(*logps())
        torch.testing.assert_close(result, 3.0 * dpo_loss(*logps()))
        with pytest.raises(ValueError, match="already registered"):
            register_preference_loss("doubled_dpo", doubled_dpo)
    finally:
        PREFERENCE_LOSSES.pop("doubled_dpo", None)


def test_register_preference_loss_invalid_name():
    with pytest.raises(ValueError, match="invalid loss name"):
        register_preference_loss("Bad-Name", dpo_loss)


def test_save_preference_loss_rejects_unsafe_code(tmp_path):
    path = tmp_path / "loss.json"
    with pytest.raises(ValueError, match="static check failed"):
        save_preference_loss(path, "evil", "import os\n")
    assert not path.exists()


def test_reward_stats():
    stats = preference_reward_stats(*logps(), beta=0.5)
    # chosen rewards 0.5 * (pc - rc) = [0.5, 0.5, -1, -0.25]; rejected 0.5 * (pr - rr) = [-0.5, 0.5, 1.5, 0.25]
    assert stats["rewards/chosen"] == pytest.approx((0.5 + 0.5 - 1.0 - 0.25) / 4)
    assert stats["rewards/rejected"] == pytest.approx((-0.5 + 0.5 + 1.5 + 0.25) / 4)
    assert stats["rewards/accuracy"] == pytest.approx(0.25)  # the tie at index 1 counts as wrong
    assert stats["rewards/margin"] == pytest.approx(0.5 * sum(RHO) / 4)


class StandInPolicy:
    """Model stand-in in training mode that returns fixed outputs for any inputs."""

    training = True

    def __init__(self, outputs):
        self.outputs = outputs

    def __call__(self, **kwargs):
        return self.outputs


def trl_losses(loss_type, policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta, tau=0.05):
    """Per-example losses from TRL's DPOTrainer._compute_loss, one example per call.

    The stand-in trainer carries only the attributes that method reads, and the stand-in
    model returns fixed per-token log-probabilities: one completion token per sequence, so the
    summed sequence log-probability is that token's value.
    """
    pytest.importorskip("trl")
    from trl.trainer.dpo_trainer import DPOTrainer

    results = []
    for i in range(policy_chosen.numel()):
        per_token_logps = torch.stack([policy_chosen[i : i + 1], policy_rejected[i : i + 1]])  # [2, 1]
        outputs = SimpleNamespace(
            log_probs=per_token_logps,
            entropy=torch.zeros(2, 1),
            mean_logits=torch.zeros(2, 1),
            is_top1=torch.zeros(2, 1, dtype=torch.bool),
        )
        policy = StandInPolicy(outputs)
        trainer = SimpleNamespace(
            model=policy,
            accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x),
            aux_loss_enabled=False,
            ld_alpha=None,
            precompute_ref_logps=True,
            f_divergence_type="reverse_kl",
            loss_types=[loss_type],
            loss_weights=[1.0],
            beta=beta,
            label_smoothing=0.0,
            use_weighting=False,
            args=SimpleNamespace(discopop_tau=tau),
            _metrics={"train": defaultdict(list)},
            _total_train_tokens=0,
            _tp_size=1,
        )
        inputs = {
            "input_ids": torch.zeros(2, 2, dtype=torch.long),
            "attention_mask": torch.ones(2, 2, dtype=torch.long),
            "completion_mask": torch.tensor([[0, 1], [0, 1]]),  # the prompt token, then one completion token
            "ref_chosen_logps": reference_chosen[i : i + 1],
            "ref_rejected_logps": reference_rejected[i : i + 1],
        }
        results.append(DPOTrainer._compute_loss(trainer, policy, inputs, return_outputs=False))
    return torch.stack(results)


@pytest.mark.parametrize(
    ("trl_name", "name", "params"),
    [
        ("sigmoid", "dpo", {"beta": 0.1}),
        ("sigmoid", "dpo", {"beta": 0.7}),
        ("discopop", "discopop", {"beta": 0.05, "tau": 0.05}),
        ("discopop", "discopop", {"beta": 0.5, "tau": 0.2}),
        ("hinge", "hinge", {"beta": 0.3}),
        ("ipo", "ipo", {"beta": 0.1}),
    ],
)
def test_loss_matches_trl(trl_name, name, params):
    tensors = logps()
    reference = trl_losses(trl_name, *tensors, **params)
    torch.testing.assert_close(get_preference_loss(name, **params)(*tensors), reference, rtol=1e-12, atol=1e-12)
