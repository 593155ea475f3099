"""Tests for mmalign.loops.sandbox: the static allow-list, the worker's limits, and parity with losses.py.

The hostile proposals are inputs for the sandbox on this machine only. Each must be rejected
statically or stopped in the worker with a recorded category, and a valid proposal must pass
afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import textwrap
import threading
import time

import pytest
import torch

from mmalign.loops.losses import (
    PREFERENCE_LOSSES,
    SandboxedPreferenceLoss,
    discopop_loss,
    dpo_loss,
    get_preference_loss,
    load_preference_loss,
)
from mmalign.loops.sandbox import (
    SIGNATURE,
    Sandbox,
    SandboxError,
    SandboxLimits,
    check_proposal,
    evaluate_in_sandbox,
    parse_proposal,
)
from mmalign.loops.sandbox_worker import (
    BUILTIN_FUNCTIONS,
    FUNCTIONAL_FUNCTIONS,
    TENSOR_METHODS,
    TORCH_FUNCTIONS,
    build_globals,
)

HEADER = f"def loss_fn({', '.join(SIGNATURE)}):\n"
RHO = "rho = (policy_chosen_logps - policy_rejected_logps) - (reference_chosen_logps - reference_rejected_logps)\n"


def proposal(body: str) -> str:
    """Wrap an unindented function body in the required ``def loss_fn(...)`` line."""
    return HEADER + textwrap.indent(body.strip("\n") + "\n", "    ")


DPO_CODE = proposal(RHO + "return -F.logsigmoid(beta * rho)")
# Written the way a model would, with no care for overflow, which is fine at moderate z.
DISCOPOP_CODE = proposal(
    '"""Log-ratio modulated loss."""\n'
    + RHO
    + "z = beta * rho\n"
    + "weight = torch.sigmoid(z / 0.05)\n"
    + "return (1 - weight) * -torch.nn.functional.logsigmoid(z) + weight * torch.exp(-z)"
)
MEBIBYTE = 1024**2


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(SandboxLimits(cpu_seconds=2, wall_seconds=30.0, memory_bytes=512 * MEBIBYTE)) as box:
        yield box


def assert_worker_usable(sandbox: Sandbox) -> None:
    result = sandbox.validate(DPO_CODE)
    assert result.ok, result


def random_logps(batch_size=10, seed=1):
    generator = torch.Generator().manual_seed(seed)
    values = -1.0 - 30.0 * torch.rand(4, batch_size, generator=generator, dtype=torch.float64)
    return dict(zip(SIGNATURE[:4], values, strict=True))


STATIC_REJECTIONS = {
    "import_top_level": ("import os\n" + DPO_CODE, "exactly one top-level statement"),
    "import_in_body": (proposal("import os\nreturn beta"), "Import is not allowed"),
    "dunder_import": (proposal("os = __import__('os')\nreturn beta"), "names starting with '_'"),
    "open_file": (proposal("data = open('/etc/passwd')\nreturn beta"), "unknown name open"),
    "socket": (proposal("connection = socket.socket()\nreturn beta"), "unknown name socket"),
    "while_loop": (proposal("while True:\n    pass\nreturn beta"), "While is not allowed"),
    "huge_range": (proposal("for i in range(10**12):\n    pass\nreturn beta"), "integer literal"),
    "range_over_limit": (proposal("for i in range(1001):\n    pass\nreturn beta"), "1001 steps"),
    "nested_loops": (
        proposal("for i in range(1000):\n    for j in range(1000):\n        pass\nreturn beta"),
        "nested loops run 1000000",
    ),
    "subclasses_escape": (
        proposal("classes = ().__class__.__bases__[0].__subclasses__()\nreturn beta"),
        "attributes starting with '_'",
    ),
    "getattr_load": (proposal("load = getattr(torch, 'load')\nreturn beta"), "unknown name getattr"),
    "torch_load": (proposal("state = torch.load(beta)\nreturn beta"), "torch.load is not on the allow-list"),
    "torch_zeros": (proposal("x = torch.zeros(10**11)\nreturn x"), "torch.zeros is not on the allow-list"),
    "recursion": (proposal(f"return loss_fn({', '.join(SIGNATURE)})"), "unknown name loss_fn"),
    "wrong_signature": ("def loss_fn(chosen, rejected):\n    return chosen - rejected\n", "signature must be"),
    "wrong_name": (DPO_CODE.replace("def loss_fn", "def my_loss"), "must be named loss_fn"),
    "exec_string": (proposal("exec('import os')\nreturn beta"), "unknown name exec"),
    "eval_string": (proposal("x = eval('1 + 1')\nreturn beta"), "unknown name eval"),
    "lambda": (proposal("f = lambda x: x\nreturn beta"), "Lambda is not allowed"),
    "nested_def": (proposal("def helper(x):\n    return x\nreturn beta"), "FunctionDef is not allowed"),
    "try_except": (proposal("try:\n    pass\nexcept Exception:\n    pass\nreturn beta"), "Try is not allowed"),
    "with_block": (proposal("with torch.no_grad():\n    pass\nreturn beta"), "With is not allowed"),
    "global": (proposal("global torch\nreturn beta"), "Global is not allowed"),
    "comprehension": (proposal("xs = [i for i in range(3)]\nreturn beta"), "ListComp is not allowed"),
    "f_string": (proposal("s = f'{beta}'\nreturn beta"), "JoinedStr is not allowed"),
    "out_keyword": (proposal("x = torch.exp(beta, out=policy_chosen_logps)\nreturn x"), "keyword argument out="),
    "attribute_assignment": (proposal("policy_chosen_logps.grad = beta\nreturn beta"), "only plain names"),
    "subscript_assignment": (proposal("policy_chosen_logps[0] = beta\nreturn beta"), "only plain names"),
    "shadow_torch": (proposal("torch = beta\nreturn beta"), "reserved name torch"),
    "module_as_value": (proposal("f = F\nreturn beta"), "F may only be used as F.<function>"),
    "inplace_method": (proposal("policy_chosen_logps.add_(1.0)\nreturn beta"), ".add_ is not on the allow-list"),
    "numpy_method": (proposal("x = policy_chosen_logps.numpy()\nreturn beta"), ".numpy is not on the allow-list"),
    "annotations": (DPO_CODE.replace("beta):", "beta) -> float:"), "type annotations"),
    "decorator": ("@torch.jit.script\n" + DPO_CODE, "decorators are not allowed"),
    "deep_nesting": (proposal("x = " + "-" * 300 + "beta\nreturn x"), "nest deeper than"),
    "too_long": (DPO_CODE + "#" * 5000, "characters long"),
    "syntax_error": (proposal("return (beta"), "syntax error"),
}


@pytest.mark.parametrize("case", sorted(STATIC_REJECTIONS))
def test_check_proposal_rejects(case):
    code, message = STATIC_REJECTIONS[case]
    violations = check_proposal(code)
    assert violations, f"{case} passed the static check"
    assert any(message in violation for violation in violations), violations


def test_check_proposal_reports_line():
    violations = check_proposal(proposal("x = beta\ny = open(x)\nreturn y"))
    assert violations == ["line 3: unknown name open"]


def test_check_proposal_accepts_valid_code():
    assert check_proposal(DPO_CODE) == []
    assert check_proposal(DISCOPOP_CODE) == []
    loop = proposal(RHO + "total = rho * 0\nfor i in range(3):\n    total = total + torch.relu(rho - i)\nreturn total")
    assert check_proposal(loop) == []


def test_allow_lists_exist_in_torch():
    assert [name for name in TORCH_FUNCTIONS if not hasattr(torch, name)] == []
    assert [name for name in FUNCTIONAL_FUNCTIONS if not hasattr(torch.nn.functional, name)] == []
    assert [name for name in TENSOR_METHODS if not hasattr(torch.Tensor, name)] == []


def test_runtime_namespace_allow_listed():
    namespace = build_globals()
    assert set(namespace["__builtins__"]) == set(BUILTIN_FUNCTIONS)
    assert not hasattr(namespace["torch"], "load")
    assert not hasattr(namespace["torch"], "zeros")
    assert hasattr(namespace["torch"].nn.functional, "logsigmoid")
    assert hasattr(namespace["F"], "softplus")


def test_worker_repeats_static_check(sandbox):
    # Bypass the parent's check to reach the worker's own copy of it.
    header = {"code": "import os\n", "beta": 0.1, "batch_size": 1, "weights": False}
    payload = torch.zeros(4, 1, dtype=torch.float64).numpy().tobytes()
    category, reason, output = sandbox._request(header, payload, response_bytes=24)
    assert category == "rejected_static"
    assert "exactly one top-level statement" in reason
    assert output == b""


def test_static_rejection_skips_worker():
    box = Sandbox()
    result = box.validate(STATIC_REJECTIONS["import_top_level"][0])
    assert result.category == "rejected_static"
    assert box.starts == 0


def test_parse_proposal():
    parsed = parse_proposal(json.dumps({"thought": "t", "name": "my_loss", "code": DPO_CODE}))
    assert parsed.name == "my_loss"
    with pytest.raises(ValueError, match="string fields"):
        parse_proposal(json.dumps({"thought": "t", "name": "my_loss"}))
    with pytest.raises(ValueError, match="invalid proposal name"):
        parse_proposal(json.dumps({"thought": "t", "name": "../x", "code": DPO_CODE}))
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_proposal("{")


RUNTIME_FAILURES = {
    # 1.6 GB each: more than the 512 MiB limit, but an allocation that succeeds without the limit.
    "tensor_allocation": (proposal("x = policy_chosen_logps.repeat(20000000)\nreturn x[:10]"), "memory"),
    "list_allocation": (proposal("x = [beta] * 200000000\nreturn policy_chosen_logps"), "memory"),
    "scalar_return": (proposal(RHO + "return (beta * rho).mean()"), "wrong_shape"),
    "float_return": (proposal("return beta"), "wrong_shape"),
    "no_return": (proposal("x = beta"), "wrong_shape"),
    "nan_loss": (proposal("return (policy_chosen_logps - policy_chosen_logps) / 0.0"), "non_finite"),
    "inf_gradient": (
        proposal("return torch.sqrt(policy_chosen_logps - policy_chosen_logps) + policy_rejected_logps"),
        "non_finite",
    ),
    "detached": (proposal(RHO + "return (beta * rho).detach()"), "no_gradient"),
    "reference_only": (proposal("return reference_chosen_logps * beta"), "no_gradient"),
    "one_policy_input": (proposal("return -policy_chosen_logps"), "no_gradient"),
    "type_error": (proposal("return torch.exp(policy_chosen_logps, policy_chosen_logps)"), "crash"),
    "zero_division": (proposal("x = 1 / 0\nreturn policy_chosen_logps"), "crash"),
}


@pytest.mark.parametrize("case", sorted(RUNTIME_FAILURES))
def test_runtime_failure_recorded(sandbox, case):
    code, category = RUNTIME_FAILURES[case]
    assert check_proposal(code) == [], "this case must reach the worker"
    result = sandbox.validate(code)
    assert not result.ok
    assert result.category == category, result
    assert result.reason
    assert_worker_usable(sandbox)


def test_memory_error_keeps_worker(sandbox):
    assert_worker_usable(sandbox)
    pid = sandbox.pid
    result = sandbox.validate(RUNTIME_FAILURES["tensor_allocation"][0])
    assert result.category == "memory"
    assert "allocate" in result.reason
    assert sandbox.pid == pid


SLOW_CODE = proposal(
    "x = policy_chosen_logps.detach().repeat(100000)\n"
    "for i in range(1000):\n    for j in range(10):\n        x = torch.exp(torch.sin(x))\n"
    "return policy_chosen_logps + x[:10]"
)


def test_cpu_limit_kills_and_restarts_worker(sandbox):
    assert check_proposal(SLOW_CODE) == []
    assert_worker_usable(sandbox)
    starts = sandbox.starts
    started = time.monotonic()
    result = sandbox.validate(SLOW_CODE)
    assert result.category == "timeout", result
    assert "SIGXCPU" in result.reason
    assert time.monotonic() - started < sandbox.limits.wall_seconds
    assert sandbox.pid is None
    assert_worker_usable(sandbox)
    assert sandbox.starts == starts + 1


def test_wall_clock_limit_and_worker_death():
    with Sandbox(SandboxLimits(cpu_seconds=60, wall_seconds=1.5, memory_bytes=512 * MEBIBYTE)) as box:
        result = box.validate(SLOW_CODE)
        assert result.category == "timeout", result
        assert "wall-clock" in result.reason
        assert box.pid is None

        # A worker that dies during a request is reported as a crash and replaced.
        assert_worker_usable(box)
        killer = threading.Timer(0.5, os.kill, (box.pid, signal.SIGSEGV))
        killer.start()
        result = box.validate(SLOW_CODE)
        killer.join()
        assert result.category == "crash", result
        assert "SIGSEGV" in result.reason
        assert_worker_usable(box)
        assert box.starts == 3


def test_killed_worker_restarts(sandbox):
    assert_worker_usable(sandbox)
    starts = sandbox.starts
    os.kill(sandbox.pid, signal.SIGKILL)
    time.sleep(0.2)
    assert_worker_usable(sandbox)
    assert sandbox.starts == starts + 1


def read_proc(pid: int, name: str) -> str:
    with open(f"/proc/{pid}/{name}", encoding="utf-8") as file:
        return file.read()


def test_worker_limits_applied(sandbox):
    assert_worker_usable(sandbox)
    limits = {
        " ".join(line.split()[:-3]): line.split()[-3:-1] for line in read_proc(sandbox.pid, "limits").splitlines()[1:]
    }
    info = sandbox.worker_info
    assert limits["Max file size"] == ["0", "0"]
    assert limits["Max core file size"] == ["0", "0"]
    assert limits["Max processes"] == ["0", "0"]
    assert limits["Max open files"] == [str(info["max_open_files"])] * 2
    assert info["max_open_files"] <= 16
    assert limits["Max address space"] == [str(info["address_space_limit"])] * 2
    assert info["address_space_limit"] - info["baseline_address_space"] == 512 * MEBIBYTE
    uid = int(read_proc(sandbox.pid, "status").split("Uid:")[1].split()[0])
    if os.geteuid() == 0:
        assert uid == 65534
        assert info["dropped_privileges"] is True


def test_warm_latency_under_one_second(sandbox):
    assert_worker_usable(sandbox)
    started = time.perf_counter()
    for _ in range(10):
        assert_worker_usable(sandbox)
    assert (time.perf_counter() - started) / 10 < 1.0


@pytest.mark.parametrize(
    ("code", "reference", "beta"),
    [(DPO_CODE, dpo_loss, 0.1), (DISCOPOP_CODE, discopop_loss, 0.05)],
    ids=["dpo", "discopop"],
)
def test_sandbox_matches_builtin_loss(sandbox, code, reference, beta):
    assert sandbox.validate(code, beta=beta).ok
    tensors = random_logps()
    losses, (grad_chosen, grad_rejected) = evaluate_in_sandbox(code, tensors, beta=beta, sandbox=sandbox)

    chosen = tensors["policy_chosen_logps"].clone().requires_grad_(True)
    rejected = tensors["policy_rejected_logps"].clone().requires_grad_(True)
    expected = reference(chosen, rejected, tensors["reference_chosen_logps"], tensors["reference_rejected_logps"], beta)
    expected.sum().backward()
    torch.testing.assert_close(losses, expected.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(grad_chosen, chosen.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad_rejected, rejected.grad, rtol=0, atol=1e-6)


def test_evaluate_raises_sandbox_error(sandbox):
    with pytest.raises(SandboxError) as caught:
        evaluate_in_sandbox(RUNTIME_FAILURES["nan_loss"][0], random_logps(), sandbox=sandbox)
    assert caught.value.result.category == "non_finite"


def test_sandboxed_loss_backward(sandbox):
    tensors = random_logps(batch_size=6)
    weights = torch.linspace(0.5, 2.0, 6, dtype=torch.float64)
    # Uniform upstream gradient (from .mean()), then a per-example one (needs a second worker run).
    for reduce in (lambda losses: losses.mean(), lambda losses: (weights * losses).sum()):
        results = []
        for loss in (SandboxedPreferenceLoss(DPO_CODE, sandbox=sandbox), dpo_loss):
            chosen = tensors["policy_chosen_logps"].clone().requires_grad_(True)
            rejected = tensors["policy_rejected_logps"].clone().requires_grad_(True)
            reduce(
                loss(chosen, rejected, tensors["reference_chosen_logps"], tensors["reference_rejected_logps"], 0.1)
            ).backward()
            results.append((chosen.grad, rejected.grad))
        torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-9)


def test_load_preference_loss_registers(sandbox, tmp_path):
    path = tmp_path / "discovered.json"
    path.write_text(json.dumps({"name": "discovered_dpo", "code": DPO_CODE}))
    try:
        spec = load_preference_loss(path, sandbox=sandbox)
        assert PREFERENCE_LOSSES["discovered_dpo"] is spec
        tensors = list(random_logps().values())
        torch.testing.assert_close(
            get_preference_loss("discovered_dpo")(*tensors), dpo_loss(*tensors), rtol=0, atol=1e-9
        )
    finally:
        PREFERENCE_LOSSES.pop("discovered_dpo", None)


@pytest.mark.parametrize("case", ["getattr_load", "nan_loss"])
def test_load_preference_loss_rejects(sandbox, tmp_path, case):
    code = STATIC_REJECTIONS.get(case, RUNTIME_FAILURES.get(case))[0]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"name": "bad_loss", "code": code}))
    with pytest.raises(ValueError, match="failed sandbox validation"):
        load_preference_loss(path, sandbox=sandbox)
    assert "bad_loss" not in PREFERENCE_LOSSES
