"""Static checks and process isolation for model-proposed preference-loss code.

A proposal is JSON ``{"thought", "name", "code"}`` whose ``code`` defines
``loss_fn(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
reference_rejected_logps, beta)`` returning per-example losses of shape ``(B,)``.
Proposal code never runs in the calling process. It passes two layers.

1. :func:`check_proposal` parses the code with :mod:`ast` and accepts only an allow-list
   (the constants in :mod:`mmalign.loops.sandbox_worker`):

   - exactly one top-level statement, ``def loss_fn`` with the signature above;
   - assignments to plain names, ``return``, ``if``, expression statements,
     ``pass``/``break``/``continue``;
   - ``for <name> in range(<int literals>)``, at most 1000 steps per loop and 10000 in a nest;
   - arithmetic, comparison and boolean operators, subscripts and slices;
   - calls to allow-listed ``torch.*``, ``F.*`` (or ``torch.nn.functional.*``), ``math.*``
     and builtin functions and tensor methods, with allow-listed keyword arguments.

   Everything else is rejected: imports, helper or nested functions, lambdas,
   comprehensions, string constants other than a docstring, and names or attributes that
   start with ``_``. ``loss_fn`` cannot refer to itself, so recursion is impossible.
2. A persistent worker process imports torch once and evaluates proposals one at a time. It
   repeats the static check. The code runs with builtins reduced to the allow-list and with
   ``torch``, ``F`` and ``math`` replaced by namespaces that contain only the allow-listed
   functions. The worker runs under ``setrlimit`` limits: CPU seconds per proposal, address
   space, no new file descriptors, processes or threads, and no core dumps. When started by
   root it switches to user ``nobody``. The parent enforces a wall-clock limit by killing the
   worker's process group, and the next request starts a new worker.

Worker and parent exchange a JSON header plus raw float64 bytes whose length the parent
computes itself, so the parent never unpickles data the worker controls.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mmalign.loops.sandbox_worker import CATEGORIES, SIGNATURE, check_proposal  # noqa: F401 - re-exported
from mmalign.loops.sandbox_worker import FRAME, MAX_HEADER_BYTES, encode_message, write_all

logger = logging.getLogger("mmalign.loops")

_PROPOSAL_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_WORKER_SCRIPT = Path(__file__).with_name("sandbox_worker.py")
# The worker gets no CUDA device and one CPU thread, so it never needs to start a thread.
_WORKER_ENV = {
    "PATH": os.defpath,
    "LANG": "C.UTF-8",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "CUDA_VISIBLE_DEVICES": "",
}


@dataclass(frozen=True)
class Proposal:
    """A model-proposed loss: the model's reasoning, a registry name and the code."""

    thought: str
    name: str
    code: str


def parse_proposal(text: str) -> Proposal:
    """Parse a JSON proposal ``{"thought", "name", "code"}``.

    Raises:
        ValueError: If the text is not a JSON object with those three string fields, or the
            name is not lower-case letters, digits and ``_`` starting with a letter.
    """
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"proposal is not valid JSON: {error}") from error
    if not isinstance(record, dict) or any(not isinstance(record.get(key), str) for key in ("thought", "name", "code")):
        raise ValueError("proposal must be a JSON object with string fields 'thought', 'name' and 'code'")
    if not _PROPOSAL_NAME.match(record["name"]):
        raise ValueError(f"invalid proposal name {record['name']!r}: use [a-z][a-z0-9_]*, at most 64 characters")
    return Proposal(record["thought"], record["name"], record["code"])


@dataclass(frozen=True)
class ValidationResult:
    """Outcome of checking and running one proposal.

    Attributes:
        ok: True if the proposal passed every check.
        reason: What failed, with the line for static violations; empty when ``ok``.
        category: One of ``rejected_static``, ``timeout``, ``memory``, ``crash``,
            ``wrong_shape``, ``non_finite``, ``no_gradient`` or ``ok``.
    """

    ok: bool
    reason: str
    category: str


class SandboxError(RuntimeError):
    """Error raised when proposal code fails in the sandbox; ``result`` contains the category and reason."""

    def __init__(self, result: ValidationResult):
        super().__init__(f"{result.category}: {result.reason}")
        self.result = result


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of the sandbox worker.

    Attributes:
        cpu_seconds: CPU time one request may use (RLIMIT_CPU, raised per request).
        wall_seconds: Time the parent waits for a response before killing the worker.
        memory_bytes: Address space the worker may map beyond its size after importing torch
            (RLIMIT_AS).
        startup_seconds: Time the worker may take to import torch and report ready.
    """

    cpu_seconds: int = 5
    wall_seconds: float = 10.0
    memory_bytes: int = 2 * 1024**3
    startup_seconds: float = 120.0


class Sandbox:
    """Evaluates proposal code in a persistent, resource-limited worker process.

    The worker starts on the first request. After it is killed or dies, the next request
    starts a new one. Requests are serialized with a lock. Use as a context manager or call
    :meth:`close`.

    Attributes:
        starts: Number of worker processes started so far.
        worker_info: What the running worker reported at startup: uid, address-space limit
            and torch version.
    """

    def __init__(self, limits: SandboxLimits | None = None):
        self.limits = limits or SandboxLimits()
        self.starts = 0
        self.worker_info: dict = {}
        self._process: subprocess.Popen | None = None
        self._stderr_tail: deque[str] = deque(maxlen=20)
        self._stderr_thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        """Process id of the running worker, or None."""
        alive = self._process is not None and self._process.poll() is None
        return self._process.pid if alive else None

    def start(self) -> None:
        """Start a worker and wait until it has imported torch and applied its limits.

        Raises:
            RuntimeError: If the worker does not report ready within ``startup_seconds``.
        """
        limits = self.limits
        command = [
            sys.executable, "-I", "-B", str(_WORKER_SCRIPT),
            "--cpu-seconds", str(limits.cpu_seconds),
            "--memory-bytes", str(limits.memory_bytes),
        ]  # fmt: skip
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
            cwd="/",
            env=_WORKER_ENV,
            start_new_session=True,  # its own process group, so a kill reaches everything in it
        )
        self.starts += 1
        self._stderr_tail = deque(maxlen=20)
        self._stderr_thread = threading.Thread(
            target=_drain_stderr, args=(self._process, self._stderr_tail), daemon=True
        )
        self._stderr_thread.start()
        try:
            info, _ = self._read_message(time.monotonic() + limits.startup_seconds, max_payload=0)
        except (TimeoutError, EOFError, OSError, ValueError) as error:
            self._release(kill=True)
            tail = " | ".join(self._stderr_tail)
            raise RuntimeError(f"sandbox worker failed to start ({error!r}); stderr: {tail}") from error
        if info.get("ready") is not True:
            self._release(kill=True)
            raise RuntimeError(f"sandbox worker sent an invalid ready message: {str(info)[:200]}")
        self.worker_info = info
        if info.get("uid") == 0:
            logger.warning("sandbox worker pid %d runs as root, so RLIMIT_NPROC does not bind", self._process.pid)
        logger.info(
            "started sandbox worker pid %d (uid %s, address-space limit %s bytes, torch %s)",
            self._process.pid, info.get("uid"), info.get("address_space_limit"), info.get("torch"),
        )  # fmt: skip

    def close(self) -> None:
        """Stop the worker: close its stdin, then kill it if it has not exited after 2 s."""
        if self._process is None:
            return
        self._process.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(timeout=2.0)
        self._release(kill=True)

    def validate(self, code: str, *, beta: float = 0.1, batch_size: int = 10, seed: int = 0) -> ValidationResult:
        """Check ``code`` statically, then run it on random log-probabilities in the worker.

        The inputs have shape ``(batch_size,)`` with values in ``[-100, -1)``. The proposal
        passes if it returns a finite float tensor of that shape, and the gradients of its sum
        with respect to both policy inputs exist and are finite.
        """
        generator = torch.Generator().manual_seed(seed)
        logps = -1.0 - 99.0 * torch.rand(4, batch_size, generator=generator, dtype=torch.float64)
        try:
            self.evaluate(code, dict(zip(SIGNATURE[:4], logps, strict=True)), beta=beta)
        except SandboxError as error:
            return error.result
        return ValidationResult(True, "", "ok")

    def evaluate(
        self, code: str, tensors: Mapping[str, Tensor], *, beta: float, weights: Tensor | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Compute per-example losses and their gradients in the worker.

        Args:
            code: Proposal code defining ``loss_fn``.
            tensors: The four log-probability tensors of shape ``(B,)``, keyed by the
                argument names of ``loss_fn``.
            beta: Passed to ``loss_fn``.
            weights: Per-example weights ``w`` of shape ``(B,)``; the gradients are those of
                ``sum(w * losses)``. All ones if None.

        Returns:
            ``(losses, (grad_policy_chosen, grad_policy_rejected))``, each of shape ``(B,)``
            with the dtype and device of ``policy_chosen_logps``.

        Raises:
            SandboxError: If the code fails the static check or any runtime check.
            ValueError: If ``tensors`` has wrong keys or shapes.
        """
        violations = check_proposal(code)
        if violations:
            raise SandboxError(ValidationResult(False, "; ".join(violations), "rejected_static"))
        if set(tensors) != set(SIGNATURE[:4]):
            raise ValueError(f"tensors must have exactly the keys {list(SIGNATURE[:4])}, got {sorted(tensors)}")
        reference = tensors[SIGNATURE[0]]
        batch_size = reference.numel()
        if any(tensors[key].shape != (batch_size,) for key in SIGNATURE[:4]):
            raise ValueError(f"all tensors must have shape (B,); got {[tuple(t.shape) for t in tensors.values()]}")
        columns = [tensors[key].detach().to("cpu", torch.float64) for key in SIGNATURE[:4]]
        if weights is not None:
            columns.append(weights.detach().to("cpu", torch.float64).reshape(batch_size))
        payload = torch.stack(columns).numpy().tobytes()  # [4 or 5, B] float64
        header = {"code": code, "beta": float(beta), "batch_size": batch_size, "weights": weights is not None}

        with self._lock:
            category, reason, output = self._request(header, payload, response_bytes=3 * batch_size * 8)
        if category != "ok":
            raise SandboxError(ValidationResult(False, reason, category))
        values = torch.frombuffer(bytearray(output), dtype=torch.float64).reshape(3, batch_size)
        # The worker already checked this; the parent checks again rather than trust its output.
        if not torch.isfinite(values).all():
            raise SandboxError(ValidationResult(False, "the worker returned non-finite values", "non_finite"))
        losses, grad_chosen, grad_rejected = values.to(reference.device, reference.dtype)
        return losses, (grad_chosen, grad_rejected)

    def _request(self, header: dict, payload: bytes, response_bytes: int) -> tuple[str, str, bytes]:
        """Send one request and return ``(category, reason, payload)``, restarting the worker first if needed."""
        if self.pid is None:
            if self._process is not None:
                returncode = self._release(kill=False)
                logger.warning("sandbox worker exited with %s between requests; restarting it", returncode)
            self.start()
        deadline = time.monotonic() + self.limits.wall_seconds
        try:
            write_all(self._process.stdin.fileno(), encode_message(header, payload))
            response, output = self._read_message(deadline, max_payload=response_bytes)
        except TimeoutError:
            self._release(kill=True)
            reason = f"no response within the wall-clock limit of {self.limits.wall_seconds} s; worker killed"
            logger.warning("sandbox worker timed out: %s", reason)
            return "timeout", reason, b""
        except (EOFError, OSError):
            return self._exit_result()
        except ValueError as error:
            self._release(kill=True)
            logger.warning("invalid response from the sandbox worker, killed it: %s", error)
            return "crash", f"invalid response from the worker: {error}", b""

        category, reason = response.get("category"), response.get("reason")
        ok_size = category != "ok" or len(output) == response_bytes
        if category not in CATEGORIES or not isinstance(reason, str) or not ok_size:
            self._release(kill=True)
            return "crash", f"invalid response header from the worker: {str(response)[:200]}", b""
        return category, reason[:2000], output

    def _read_message(self, deadline: float, max_payload: int) -> tuple[dict, bytes]:
        """Read one framed message from the worker; raises TimeoutError, EOFError or ValueError."""
        fd = self._process.stdout.fileno()
        header_size, payload_size = FRAME.unpack(_read_exact(fd, FRAME.size, deadline))
        if header_size > MAX_HEADER_BYTES or payload_size > max_payload:
            raise ValueError(f"message sizes ({header_size}, {payload_size}) exceed the expected maximum")
        header = json.loads(_read_exact(fd, header_size, deadline).decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("message header is not a JSON object")
        return header, _read_exact(fd, payload_size, deadline)

    def _exit_result(self) -> tuple[str, str, bytes]:
        """Reap a worker that died during a request and classify why."""
        returncode = self._release(kill=False)
        tail = " | ".join(list(self._stderr_tail)[-3:])
        if returncode == -signal.SIGXCPU:
            category, reason = "timeout", f"CPU-time limit of {self.limits.cpu_seconds} s exceeded (SIGXCPU)"
        elif any(marker in tail for marker in ("bad_alloc", "MemoryError", "allocate memory")):
            category, reason = "memory", f"worker ran out of memory: {tail}"
        elif returncode == -signal.SIGKILL:
            category, reason = "memory", "worker killed by SIGKILL, probably by the kernel's out-of-memory killer"
        else:
            status = f"signal {signal.Signals(-returncode).name}" if returncode < 0 else f"exit code {returncode}"
            category, reason = "crash", f"worker died with {status}; stderr: {tail}"
        logger.warning("sandbox worker died (%s): %s", category, reason)
        return category, reason, b""

    def _release(self, kill: bool) -> int | None:
        """Reap the worker, killing its process group first if ``kill``, close its pipes and return its exit status.

        A worker that has not exited 5 s after its output closed is killed as well.
        """
        process, self._process = self._process, None
        if process is None:
            return None
        if kill:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        try:
            returncode = process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            returncode = process.wait()
        self._stderr_thread.join(timeout=1.0)
        process.stdin.close()
        process.stdout.close()
        return returncode


def _drain_stderr(process: subprocess.Popen, tail: deque[str]) -> None:
    """Read the worker's stderr until it closes, keeping the last lines and logging each at debug level.

    Reading continuously keeps the pipe from filling up, which would block the worker.
    """
    for raw in iter(process.stderr.readline, b""):
        line = raw.decode("utf-8", "replace").rstrip()[:500]
        tail.append(line)
        logger.debug("sandbox worker %d: %s", process.pid, line)
    process.stderr.close()


def _read_exact(fd: int, size: int, deadline: float) -> bytes:
    chunks, remaining = [], size
    while remaining:
        timeout = deadline - time.monotonic()
        if timeout <= 0 or not select.select([fd], [], [], timeout)[0]:
            raise TimeoutError("no data from the sandbox worker within the time limit")
        chunk = os.read(fd, min(remaining, 1 << 20))
        if not chunk:
            raise EOFError("the sandbox worker closed its output")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


_default_sandbox: Sandbox | None = None


def default_sandbox() -> Sandbox:
    """Return the process-wide sandbox with default limits, created on first use."""
    global _default_sandbox
    if _default_sandbox is None:
        _default_sandbox = Sandbox()
        atexit.register(_default_sandbox.close)
    return _default_sandbox


def validate_proposal(code: str, *, beta: float = 0.1, sandbox: Sandbox | None = None) -> ValidationResult:
    """Validate proposal code in ``sandbox`` (default: :func:`default_sandbox`)."""
    return (sandbox or default_sandbox()).validate(code, beta=beta)


def evaluate_in_sandbox(
    code: str,
    tensors: Mapping[str, Tensor],
    *,
    beta: float = 0.1,
    weights: Tensor | None = None,
    sandbox: Sandbox | None = None,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Compute losses and gradients of proposal code in ``sandbox``; see :meth:`Sandbox.evaluate`.

    To train through the result, call
    ``torch.autograd.backward([pc, pr], [grad_pc / B, grad_pr / B])`` for a mean loss, or use
    :class:`mmalign.loops.losses.SandboxedPreferenceLoss`.
    """
    return (sandbox or default_sandbox()).evaluate(code, tensors, beta=beta, weights=weights)


__all__ = [
    "CATEGORIES", "SIGNATURE", "Proposal", "Sandbox", "SandboxError", "SandboxLimits", "ValidationResult",
    "check_proposal", "default_sandbox", "evaluate_in_sandbox", "parse_proposal", "validate_proposal",
]  # fmt: skip
