"""The sandbox's allow-list check and the worker process that runs proposal code.

:func:`check_proposal` is the static allow-list check described in
:mod:`mmalign.loops.sandbox`. The parent runs it before sending code, and the worker runs it
again on the tree it compiles. :class:`mmalign.loops.sandbox.Sandbox` starts the worker as
``python -I -B <this file>``, which imports nothing from mmalign. The worker imports torch once,
applies its resource limits, then serves requests on stdin until stdin closes.

Each message in both directions is an 8-byte big-endian header ``(json_bytes,
payload_bytes)`` followed by a UTF-8 JSON object and raw float64 bytes. A request carries
``{"code", "beta", "batch_size", "weights"}`` and the four log-probability vectors (plus the
weights, if any). A response carries ``{"category", "reason"}`` and, when the category is
``ok``, the losses and the gradients with respect to the two policy inputs.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import resource
import signal
import struct
import sys
from types import SimpleNamespace

FRAME = struct.Struct(">II")
MAX_HEADER_BYTES = 1 << 16
CATEGORIES = ("ok", "rejected_static", "timeout", "memory", "crash", "wrong_shape", "non_finite", "no_gradient")
NOBODY_UID = 65534

SIGNATURE = (
    "policy_chosen_logps",
    "policy_rejected_logps",
    "reference_chosen_logps",
    "reference_rejected_logps",
    "beta",
)
TORCH_FUNCTIONS = frozenset(
    "abs amax amin asinh atan cat ceil clamp clip cos cosh cumsum erf erfc exp exp2 expm1 floor fmax fmin"
    " fmod frac full_like heaviside hypot lerp log log10 log1p log2 log_softmax logaddexp logsumexp max"
    " maximum mean min minimum nan_to_num neg ones_like pow prod reciprocal relu remainder round rsqrt"
    " sigmoid sign sin sinh softmax sqrt square stack std sum tanh trunc var where xlogy zeros_like".split()
)
FUNCTIONAL_FUNCTIONS = frozenset(
    "celu elu gelu hardtanh leaky_relu log_softmax logsigmoid mish relu relu6 selu sigmoid silu softmax"
    " softplus softsign tanh".split()
)
MATH_FUNCTIONS = frozenset("exp expm1 log log1p sqrt tanh".split())
MATH_CONSTANTS = frozenset("e inf pi tau".split())
# `repeat` can allocate without bound; the worker's address-space limit stops that at runtime.
TENSOR_METHODS = frozenset(
    "abs amax amin clamp clamp_max clamp_min clip cos cumsum detach dim double exp expand expand_as expm1"
    " flatten float floor lerp log log1p log2 log_softmax logaddexp logsumexp max maximum mean min minimum"
    " neg numel pow prod reciprocal relu repeat reshape round rsqrt sigmoid sign sin size softmax sqrt"
    " square squeeze std sum tanh unsqueeze var view where".split()
)
TENSOR_ATTRIBUTES = frozenset({"shape"})
BUILTIN_FUNCTIONS = frozenset({"abs", "float", "int", "len", "max", "min", "range"})
CALL_KEYWORDS = frozenset("alpha beta correction dim exponent keepdim max min negative_slope threshold".split())
MODULE_NAMES = {"torch": TORCH_FUNCTIONS, "F": FUNCTIONAL_FUNCTIONS, "math": MATH_FUNCTIONS}

MAX_CODE_CHARS = 4096
MAX_AST_NODES = 2000
MAX_AST_DEPTH = 60
MAX_DOCSTRING_CHARS = 1000
MAX_RANGE_STEPS = 1000
MAX_LOOP_ITERATIONS = 10_000

_ALLOWED_NODES = (
    # statements
    ast.Assign, ast.AugAssign, ast.Return, ast.If, ast.For, ast.Expr, ast.Pass, ast.Break, ast.Continue,
    # expressions
    ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.IfExp, ast.Call, ast.keyword, ast.Attribute,
    ast.Name, ast.Constant, ast.Subscript, ast.Slice, ast.Tuple, ast.List, ast.Load, ast.Store,
    # operators; shifts, `is` and `in` are left out
    ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.MatMult, ast.BitAnd, ast.BitOr,
    ast.BitXor, ast.UAdd, ast.USub, ast.Not, ast.Invert, ast.And, ast.Or, ast.Eq, ast.NotEq, ast.Lt,
    ast.LtE, ast.Gt, ast.GtE,
)  # fmt: skip
_RESERVED_NAMES = frozenset({"loss_fn", *MODULE_NAMES, *BUILTIN_FUNCTIONS})


def check_proposal(code: str) -> list[str]:
    """Check proposal code against the allow-list without running it.

    Returns:
        Violations as ``"line N: message"`` strings; empty if the code is accepted.
    """
    if not isinstance(code, str):
        return [f"code must be a string, got {type(code).__name__}"]
    if len(code) > MAX_CODE_CHARS:
        return [f"code is {len(code)} characters long; the limit is {MAX_CODE_CHARS}"]
    try:
        tree = ast.parse(code, mode="exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as error:
        return [f"line {getattr(error, 'lineno', '?')}: syntax error: {error}"]
    return check_tree(tree)


def check_tree(tree: ast.Module) -> list[str]:
    """Check a parsed proposal against the allow-list; see :func:`check_proposal`."""
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.FunctionDef):
        return ["line 1: code must contain exactly one top-level statement, `def loss_fn(...)`, and no imports"]
    function = tree.body[0]
    violations = _check_signature(function)

    # Walk iteratively, so that deep nesting cannot overflow the Python stack here.
    parents: dict[ast.AST, ast.AST] = {}
    depths: dict[ast.AST, int] = {function: 0}
    nodes: list[ast.AST] = []
    stack: list[ast.AST] = [function]
    while stack:
        node = stack.pop()
        nodes.append(node)
        if len(nodes) > MAX_AST_NODES:
            return [*violations, f"line 1: code has more than {MAX_AST_NODES} syntax nodes"]
        if depths[node] > MAX_AST_DEPTH:
            return [*violations, f"line {getattr(node, 'lineno', 1)}: expressions nest deeper than {MAX_AST_DEPTH}"]
        for child in ast.iter_child_nodes(node):
            parents[child] = node
            depths[child] = depths[node] + 1
            stack.append(child)

    nodes.sort(key=lambda node: (getattr(node, "lineno", 0), getattr(node, "col_offset", 0)))
    docstring = None
    first = function.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        docstring = first.value
    local_names = set(SIGNATURE)
    for node in nodes:
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            local_names.add(node.id)

    for node in nodes:
        if node is function or isinstance(node, (ast.arguments, ast.arg)):
            continue
        line = getattr(node, "lineno", None) or getattr(parents.get(node), "lineno", "?")
        for message in _check_node(node, parents, local_names, docstring):
            violations.append(f"line {line}: {message}")
    return violations


def _check_signature(function: ast.FunctionDef) -> list[str]:
    args = function.args
    names = tuple(arg.arg for arg in args.args)
    problems = []
    if function.name != "loss_fn":
        problems.append(f"the function must be named loss_fn, not {function.name}")
    if names != SIGNATURE or args.posonlyargs or args.vararg or args.kwonlyargs or args.kwarg:
        problems.append(f"the signature must be loss_fn({', '.join(SIGNATURE)})")
    if args.defaults or args.kw_defaults:
        problems.append("loss_fn arguments must not have default values")
    if function.decorator_list:
        problems.append("decorators are not allowed")
    if function.returns is not None or any(arg.annotation is not None for arg in args.args):
        problems.append("type annotations are not allowed; remove them")
    if getattr(function, "type_params", None):
        problems.append("type parameters are not allowed")
    return [f"line {function.lineno}: {problem}" for problem in problems]


def _check_node(node: ast.AST, parents: dict, local_names: set[str], docstring: ast.AST | None) -> list[str]:
    if not isinstance(node, _ALLOWED_NODES):
        return [f"{type(node).__name__} is not allowed"]
    parent = parents.get(node)
    is_called = isinstance(parent, ast.Call) and parent.func is node

    if isinstance(node, ast.Name):
        if node.id.startswith("_"):
            return [f"names starting with '_' are not allowed: {node.id}"]
        if isinstance(node.ctx, ast.Store):
            return [f"cannot assign to reserved name {node.id}"] if node.id in _RESERVED_NAMES else []
        if node.id in MODULE_NAMES:
            ok = isinstance(parent, ast.Attribute) and parent.value is node
            return [] if ok else [f"{node.id} may only be used as {node.id}.<function>"]
        if node.id == "range":
            ok = is_called and isinstance(parents.get(parent), ast.For) and parents[parent].iter is parent
            return [] if ok else ["range() is allowed only as the iterable of a for loop"]
        if node.id in BUILTIN_FUNCTIONS:
            return [] if is_called else [f"builtin {node.id} may only be called"]
        return [] if node.id in local_names else [f"unknown name {node.id}"]

    if isinstance(node, ast.Attribute):
        return _check_attribute(node, parent, is_called)

    if isinstance(node, ast.Call):
        problems = []
        if not isinstance(node.func, (ast.Name, ast.Attribute)):
            problems.append("only allow-listed functions and tensor methods may be called")
        for keyword in node.keywords:
            if keyword.arg is None:
                problems.append("**kwargs in calls are not allowed")
            elif keyword.arg not in CALL_KEYWORDS:
                problems.append(f"keyword argument {keyword.arg}= is not allowed; allowed: {sorted(CALL_KEYWORDS)}")
        return problems

    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, str):
            ok = node is docstring and len(value) <= MAX_DOCSTRING_CHARS
            return [] if ok else ["string constants are not allowed, except a short docstring"]
        ok = value is None or isinstance(value, (bool, int, float))
        return [] if ok else [f"constants of type {type(value).__name__} are not allowed"]

    if isinstance(node, (ast.Assign, ast.AugAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        for target in targets:
            elements = target.elts if isinstance(target, (ast.Tuple, ast.List)) else [target]
            if not all(isinstance(element, ast.Name) for element in elements):
                return ["only plain names may be assigned to (no subscript or attribute assignment)"]
        return []

    if isinstance(node, ast.For):
        return _check_for(node, parents)
    return []


def _check_attribute(node: ast.Attribute, parent: ast.AST | None, is_called: bool) -> list[str]:
    if node.attr.startswith("_"):
        return [f"attributes starting with '_' are not allowed: {node.attr}"]
    if not isinstance(node.ctx, ast.Load):
        return ["attribute assignment is not allowed"]
    path = _module_path(node)
    if path is None:  # an attribute of a tensor or other value
        if node.attr in TENSOR_ATTRIBUTES:
            return []
        if node.attr in TENSOR_METHODS:
            return [] if is_called else [f"tensor method .{node.attr} may only be called"]
        return [f"tensor method .{node.attr} is not on the allow-list"]
    if path in ("torch.nn", "torch.nn.functional"):
        ok = isinstance(parent, ast.Attribute) and parent.value is node
        return [] if ok else [f"{path} may only be used as {path}.<function>"]
    module, name = path.rsplit(".", 1)
    allowed = FUNCTIONAL_FUNCTIONS if module == "torch.nn.functional" else MODULE_NAMES.get(module, frozenset())
    if module == "math" and name in MATH_CONSTANTS:
        return []
    if name not in allowed:
        return [f"{path} is not on the allow-list"]
    return [] if is_called else [f"{path} may only be called"]


def _module_path(node: ast.Attribute) -> str | None:
    """Return ``"torch.nn.functional.x"`` for an attribute chain rooted at a module name, else None."""
    parts = [node.attr]
    value = node.value
    while isinstance(value, ast.Attribute):
        parts.append(value.attr)
        value = value.value
    if not isinstance(value, ast.Name) or value.id not in MODULE_NAMES:
        return None
    return ".".join([value.id, *reversed(parts)])


def _range_steps(loop: ast.For) -> int | None:
    """Return the step count of ``range(<int literals>)`` in a for loop, or None if not of that form."""
    call = loop.iter
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "range"):
        return None
    if call.keywords or not 1 <= len(call.args) <= 3:
        return None
    bounds = []
    for arg in call.args:
        negative = isinstance(arg, ast.UnaryOp) and isinstance(arg.op, ast.USub)
        literal = arg.operand if negative else arg
        if not isinstance(literal, ast.Constant) or type(literal.value) is not int:
            return None
        bounds.append(-literal.value if negative else literal.value)
    if len(bounds) == 3 and bounds[2] == 0:
        return None
    return len(range(*bounds))


def _check_for(loop: ast.For, parents: dict) -> list[str]:
    problems = []
    if not isinstance(loop.target, ast.Name):
        problems.append("a for loop must bind a single name")
    if loop.orelse:
        problems.append("for ... else is not allowed")
    steps = _range_steps(loop)
    if steps is None:
        return [*problems, "for loops must iterate over range() with integer literal arguments"]
    if steps > MAX_RANGE_STEPS:
        return [*problems, f"range() has {steps} steps; the limit is {MAX_RANGE_STEPS}"]
    total, ancestor = steps, parents.get(loop)
    while ancestor is not None:
        if isinstance(ancestor, ast.For):
            total *= _range_steps(ancestor) or 1
        ancestor = parents.get(ancestor)
    if total > MAX_LOOP_ITERATIONS:
        problems.append(f"nested loops run {total} iterations; the limit is {MAX_LOOP_ITERATIONS}")
    return problems


def encode_message(header: dict, payload: bytes = b"") -> bytes:
    """Frame a JSON header and a raw payload as one message."""
    data = json.dumps(header).encode("utf-8")
    return FRAME.pack(len(data), len(payload)) + data + payload


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to a blocking descriptor; os.write may write only part of it."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exact(stream, size: int) -> bytes | None:
    chunks, remaining = [], size
    while remaining:
        chunk = stream.read(remaining)
        if not chunk:
            return None
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def build_globals() -> dict:
    """Return the globals for proposal code: allow-listed callables only, no real modules."""
    import builtins

    import torch
    import torch.nn.functional as F

    functional = SimpleNamespace(**{name: getattr(F, name) for name in FUNCTIONAL_FUNCTIONS})
    torch_namespace = SimpleNamespace(
        **{name: getattr(torch, name) for name in TORCH_FUNCTIONS}, nn=SimpleNamespace(functional=functional)
    )
    math_namespace = SimpleNamespace(**{name: getattr(math, name) for name in MATH_FUNCTIONS | MATH_CONSTANTS})
    # Without a "__builtins__" key, exec() would insert the real builtins module.
    safe_builtins = {name: getattr(builtins, name) for name in BUILTIN_FUNCTIONS}
    return {"__builtins__": safe_builtins, "torch": torch_namespace, "F": functional, "math": math_namespace}


def _run_proposal(request: dict, payload: bytes) -> tuple[str, str, bytes]:
    """Evaluate one request; return ``(category, reason, payload)``."""
    import torch

    batch_size = request["batch_size"]
    values = torch.frombuffer(bytearray(payload), dtype=torch.float64).reshape(-1, batch_size)
    chosen, rejected, reference_chosen, reference_rejected = (values[i].clone() for i in range(4))
    weights = values[4].clone() if request["weights"] else torch.ones(batch_size, dtype=torch.float64)
    chosen.requires_grad_(True)
    rejected.requires_grad_(True)

    tree = ast.parse(request["code"], mode="exec")
    violations = check_tree(tree)
    if violations:
        return "rejected_static", "; ".join(violations), b""
    namespace = build_globals()
    exec(compile(tree, "<proposal>", "exec"), namespace)  # noqa: S102 - checked code, restricted globals
    losses = namespace["loss_fn"](chosen, rejected, reference_chosen, reference_rejected, request["beta"])

    if not isinstance(losses, torch.Tensor) or not losses.is_floating_point():
        return (
            "wrong_shape",
            f"loss_fn returned {type(losses).__name__}, expected a float tensor of shape ({batch_size},)",
            b"",
        )
    if tuple(losses.shape) != (batch_size,):
        return "wrong_shape", f"loss_fn returned shape {tuple(losses.shape)}, expected ({batch_size},)", b""
    if not torch.isfinite(losses).all():
        bad = int((~torch.isfinite(losses)).sum())
        return "non_finite", f"{bad} of {batch_size} losses are nan or inf", b""
    if not losses.requires_grad:
        return "no_gradient", "the losses do not depend on the policy log-probabilities", b""
    grads = torch.autograd.grad((losses * weights).sum(), [chosen, rejected], allow_unused=True)
    for name, grad in zip(("policy_chosen_logps", "policy_rejected_logps"), grads, strict=True):
        if grad is None:
            return "no_gradient", f"the losses have no gradient with respect to {name}", b""
        if not torch.isfinite(grad).all():
            return "non_finite", f"the gradient with respect to {name} is not finite", b""
    output = torch.stack([losses.detach().double(), grads[0].double(), grads[1].double()])
    return "ok", "", output.contiguous().numpy().tobytes()


def _evaluate_safely(request: dict, payload: bytes) -> tuple[str, str, bytes]:
    try:
        return _run_proposal(request, payload)
    except MemoryError as error:
        return "memory", f"MemoryError: {error or 'allocation failed'}"[:500], b""
    except Exception as error:  # noqa: BLE001 - any failure of proposal code is a result, not a worker error
        message = f"{type(error).__name__}: {error}"[:500]
        out_of_memory = isinstance(error, RuntimeError) and "allocate memory" in str(error)
        return ("memory" if out_of_memory else "crash"), message, b""


def _warm_up() -> None:
    """Call every allow-listed function once so that lazy imports and setup happen before the limits."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    x = torch.linspace(0.1, 0.9, 4, dtype=torch.float64, requires_grad=True)
    argument_lists = [(x,), (x, x), (x, 0.5), ([x, x],), (x, x, 0.5), (x > 0.5, x, x), (x, 0)]
    functions = [getattr(torch, name) for name in TORCH_FUNCTIONS]
    functions += [getattr(F, name) for name in FUNCTIONAL_FUNCTIONS]
    functions += [getattr(math, name) for name in MATH_FUNCTIONS]
    functions += [lambda *args, name=name: getattr(args[0], name)(*args[1:]) for name in TENSOR_METHODS]
    for function in functions:
        for arguments in argument_lists:
            try:
                function(*arguments)
            except Exception:  # noqa: BLE001, S110 - most argument lists do not fit; only the call matters
                pass
    (-F.logsigmoid(x) + torch.exp(-x)).mean().backward()
    check_proposal("def f():\n    pass\n")
    build_globals()


def _drop_privileges() -> bool:
    """Switch from root to user ``nobody``, because RLIMIT_NPROC does not bind root."""
    if os.geteuid() != 0:
        return False
    try:
        os.setgroups([])
        os.setgid(NOBODY_UID)
        os.setuid(NOBODY_UID)
    except PermissionError as error:
        sys.stderr.write(f"sandbox worker: switching to uid {NOBODY_UID} failed, staying root: {error}\n")
        return False
    return True


def _address_space_bytes() -> int:
    with open("/proc/self/status", "rb") as status:
        for line in status:
            if line.startswith(b"VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmSize not found in /proc/self/status")


def _lowest_free_fd() -> int:
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)
    return fd


def _apply_limits(memory_bytes: int) -> dict:
    """Apply the worker's limits; returns what it set, for the ready message."""
    baseline = _address_space_bytes()
    address_space = baseline + memory_bytes
    # open() returns the lowest free descriptor, so this limit leaves no room for a new one.
    max_files = _lowest_free_fd()
    dropped = _drop_privileges()
    resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (max_files, max_files))
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))  # no fork and no new threads
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file write then fails instead of killing the worker
    return {
        "baseline_address_space": baseline,
        "address_space_limit": address_space,
        "max_open_files": max_files,
        "dropped_privileges": dropped,
    }


def _set_cpu_budget(seconds: int | None) -> None:
    """Set the soft CPU limit ``seconds`` past the CPU time used so far, or lift it if None."""
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    if seconds is None:
        resource.setrlimit(resource.RLIMIT_CPU, (hard, hard))
        return
    usage = resource.getrusage(resource.RUSAGE_SELF)
    resource.setrlimit(resource.RLIMIT_CPU, (math.ceil(usage.ru_utime + usage.ru_stime) + seconds, hard))


def main(argv: list[str] | None = None) -> None:
    """Serve requests on stdin until it closes; see the module docstring for the protocol."""
    parser = argparse.ArgumentParser(description="Sandbox worker for proposed loss code.")
    parser.add_argument("--cpu-seconds", type=int, required=True, help="CPU-time limit per request, seconds")
    parser.add_argument("--memory-bytes", type=int, required=True, help="address space allowed above the baseline")
    args = parser.parse_args(argv)

    # Keep private copies of the protocol pipes, then point fd 0 at /dev/null and fd 1 at
    # stderr, so that nothing written to stdout from C code can corrupt a response.
    requests = os.fdopen(os.dup(0), "rb", buffering=0)
    responses = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)

    import torch

    _warm_up()
    info = _apply_limits(args.memory_bytes)
    info.update(ready=True, uid=os.getuid(), torch=torch.__version__)
    write_all(responses, encode_message(info))

    while True:
        frame = _read_exact(requests, FRAME.size)
        if frame is None:
            return
        header_bytes, payload_bytes = FRAME.unpack(frame)
        request = json.loads(_read_exact(requests, header_bytes) or b"null")
        payload = _read_exact(requests, payload_bytes) or b""
        _set_cpu_budget(args.cpu_seconds)
        category, reason, output = _evaluate_safely(request, payload)
        _set_cpu_budget(None)
        write_all(responses, encode_message({"category": category, "reason": reason}, output))


if __name__ == "__main__":
    main()
