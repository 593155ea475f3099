"""Proposers of preference-loss code for the loss-discovery loop, and the archive they read.

A proposer returns raw text outputs, each meant to hold one JSON object
``{"thought", "name", "code"}`` (see :mod:`mmalign.loops.sandbox`). Three kinds:

- :class:`LMProposer` prompts a local causal LM through its chat template;
- :class:`HTTPProposer` calls an OpenAI-compatible ``/v1/chat/completions`` endpoint;
- :class:`MutationProposer` recombines known loss terms offline, with a seeded generator.

The LM and HTTP proposers see the task, then the archive as a conversation. Each earlier
proposal is an assistant turn, and the user turn after it gives its fitness or its error and
ends with "Please generate the next one.".
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import textwrap
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch

from mmalign.lm import LanguageModel
from mmalign.loops.sampling import rng_devices
from mmalign.loops.sandbox import Proposal
from mmalign.loops.sandbox_worker import FUNCTIONAL_FUNCTIONS, MATH_FUNCTIONS, SIGNATURE, TENSOR_METHODS, TORCH_FUNCTIONS

logger = logging.getLogger("mmalign.loops")

MAX_OUTPUT_CHARS = 20_000
# Import lines a model often writes; the sandbox already provides these names, so they are dropped.
_HARMLESS_IMPORTS = frozenset({
    "import torch", "import math", "import torch.nn.functional as F", "from torch.nn import functional as F",
})


@dataclass
class ArchiveEntry:
    """One proposal and its outcome.

    Attributes:
        round: Round that proposed it, from 0.
        index: Position in its round.
        category: ``ok``, ``unparseable`` or a sandbox category (``rejected_static``,
            ``timeout``, ``memory``, ``crash``, ``wrong_shape``, ``non_finite``, ``no_gradient``).
        reason: What failed; empty for ``ok``.
        fitness: Fitness of the trained adapter; None unless ``ok``.
        runtime_ms: Median wall time of one sandboxed loss and gradient evaluation on fixed
            tensors; None unless the loss passed validation.
        metrics: Components of the fitness and inner-training statistics.
        raw: Start of the raw output, kept only when it could not be parsed.
    """

    round: int
    index: int
    name: str
    thought: str
    code: str
    category: str
    reason: str = ""
    fitness: float | None = None
    runtime_ms: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    raw: str = ""

    @property
    def ok(self) -> bool:
        return self.category == "ok" and self.fitness is not None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> ArchiveEntry:
        return cls(**record)


class Proposer(Protocol):
    """Source of raw proposal texts for one round."""

    def propose(self, archive: list[ArchiveEntry], previous: Proposal | None, round_index: int) -> list[str]:
        """Return raw outputs; ``previous`` is the proposal to improve (refine strategy) or None."""
        ...


class ProposalParseError(ValueError):
    """Raised when an output contains no usable proposal; ``kind`` is the failure kind the loop counts."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def extract_proposal(text: str) -> Proposal:
    """Find the proposal JSON object in a model's output, ignoring surrounding text and code fences.

    The JSON may contain raw newlines inside strings. The name is normalized to lower-case
    snake case, and exact import lines of ``torch``, ``F`` and ``math`` are dropped from the
    code. The code is not checked here.

    Raises:
        ProposalParseError: with kind ``empty_output``, ``no_json`` (no JSON object found)
            or ``missing_code`` (no object with a string ``code`` field).
    """
    text = (text or "")[:MAX_OUTPUT_CHARS]
    if not text.strip():
        raise ProposalParseError("empty_output", "the output is empty")
    decoder = json.JSONDecoder(strict=False)
    objects = []
    fenced = re.findall(r"```(?:json)?\s*\n(.*?)```", text, flags=re.DOTALL)
    for candidate in [*fenced, text]:
        for match in re.finditer(r"\{", candidate):
            try:
                value, _ = decoder.raw_decode(candidate, match.start())
            except (json.JSONDecodeError, RecursionError):  # the C decoder raises RecursionError on deep nesting
                continue
            if isinstance(value, dict):
                objects.append(value)
    if not objects:
        raise ProposalParseError("no_json", "no JSON object found in the output")
    record = next((item for item in objects if isinstance(item.get("code"), str)), None)
    if record is None:
        raise ProposalParseError("missing_code", "no JSON object with a string field 'code'")
    thought = record.get("thought") if isinstance(record.get("thought"), str) else ""
    name = normalize_name(record.get("name") if isinstance(record.get("name"), str) else "")
    return Proposal(thought, name, normalize_code(record["code"]))


def normalize_name(name: str) -> str:
    """Turn a proposed name into ``[a-z][a-z0-9_]*`` of at most 48 characters; ``loss`` if nothing is left."""
    cleaned = re.sub(r"[^a-z0-9_]+", "_", re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower())
    cleaned = re.sub(r"_+", "_", cleaned).lstrip("0123456789_").rstrip("_")[:48].rstrip("_")
    return cleaned or "loss"


def normalize_code(code: str) -> str:
    """Strip code fences and harmless import lines, and remove common indentation."""
    code = re.sub(r"^\s*```[a-zA-Z]*\s*\n", "", code)
    code = re.sub(r"\n\s*```\s*$", "\n", code)
    lines = [line for line in code.splitlines() if line.strip() not in _HARMLESS_IMPORTS]
    return textwrap.dedent("\n".join(lines)).strip("\n") + "\n"


TASK_DESCRIPTION = f"""\
You design pairwise preference losses. A vision adapter feeds a frozen language model, and for \
each image we have a chosen (good) caption and a rejected (worse) caption. The inputs are \
summed caption log-probabilities, each a float tensor of shape (B,): {", ".join(SIGNATURE[:4])}; \
the policy is being trained, the reference is frozen. beta is a positive float.

Write `def loss_fn({", ".join(SIGNATURE)}):` that returns one loss per example, a tensor of \
shape (B,). Training minimizes its mean, so it must fall as the policy prefers the chosen \
caption more than the reference does. With
rho = (policy_chosen_logps - policy_rejected_logps) - (reference_chosen_logps - reference_rejected_logps)
known losses are: logistic (DPO) -F.logsigmoid(beta * rho); hinge torch.relu(1 - beta * rho); \
IPO (rho - 1 / (2 * beta)) ** 2; exponential torch.exp(-beta * rho).

Rules: the code is a single `def loss_fn` with no imports, helper functions, lambdas or \
strings except a docstring. torch, F (torch.nn.functional) and math are already defined. \
Allowed calls: torch.{{{", ".join(sorted(TORCH_FUNCTIONS))}}}; \
F.{{{", ".join(sorted(FUNCTIONAL_FUNCTIONS))}}}; math.{{{", ".join(sorted(MATH_FUNCTIONS))}}}; \
tensor methods .{{{", ".join(sorted(TENSOR_METHODS))}}}.

Reply with one JSON object and nothing else:
{{"thought": "<one or two sentences of reasoning>", "name": "<snake_case name>", \
"code": "<the Python source of loss_fn>"}}"""


def feedback_message(entry: ArchiveEntry) -> str:
    """Return the user turn that reports an archive entry's outcome to the proposer."""
    if entry.ok:
        return f"Fitness: {entry.fitness:.4f}. Please generate the next one."
    if entry.category == "unparseable":
        return f"Your reply could not be parsed ({entry.reason}). Reply with one JSON object. Please generate the next one."
    return f"The code failed ({entry.category}): {entry.reason[:500]}. Please generate the next one."


def build_messages(archive: list[ArchiveEntry], previous: Proposal | None, context_entries: int) -> list[dict[str, str]]:
    """Build the chat messages: the task, the last ``context_entries`` archive entries with feedback, and the request.

    With ``previous`` (refine strategy) the final turn requests an improvement of that code
    instead of a free proposal.
    """
    messages = [{"role": "user", "content": TASK_DESCRIPTION}]
    recent_entries = archive[-context_entries:] if context_entries > 0 else []
    for entry in recent_entries:
        if entry.category == "unparseable":
            reply = entry.raw[:1000]
        else:
            reply = json.dumps({"thought": entry.thought, "name": entry.name, "code": entry.code})
        messages.append({"role": "assistant", "content": reply})
        messages.append({"role": "user", "content": feedback_message(entry)})
    if not recent_entries:
        messages[0]["content"] += "\n\nPlease generate the first one."
    if previous is not None:
        request = (
            f"\n\nImprove this previous proposal instead of starting over. Keep the signature and "
            f"return the whole improved function.\n{json.dumps(asdict(previous))}"
        )
        messages[-1]["content"] += request
    return messages


class LMProposer:
    """Proposals sampled from a local causal LM through its chat template.

    Args:
        lm: The proposing LM; it needs a chat template.
        n_proposals: Outputs per round, drawn in one ``generate`` call.
        temperature: Sampling temperature.
        max_new_tokens: Length cap of each output in tokens.
        context_entries: Archive entries shown in the prompt, the most recent ones.
        seed: Seed of the sampling; round ``r`` uses ``seed * 1000 + r``.
    """

    def __init__(self, lm: LanguageModel, n_proposals: int, temperature: float = 0.8, max_new_tokens: int = 384,
                 context_entries: int = 6, seed: int = 0):
        if not getattr(lm.tokenizer, "chat_template", None):
            raise ValueError(f"{lm.lm_id} has no chat template; choose an instruction-tuned LM as proposer")
        self.lm, self.n_proposals, self.temperature = lm, n_proposals, temperature
        self.max_new_tokens, self.context_entries, self.seed = max_new_tokens, context_entries, seed

    def propose(self, archive: list[ArchiveEntry], previous: Proposal | None, round_index: int) -> list[str]:
        messages = build_messages(archive, previous, self.context_entries)
        tokenizer, model = self.lm.tokenizer, self.lm.model
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        input_ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids.to(model.device)  # [1, L]
        with torch.no_grad(), torch.random.fork_rng(devices=rng_devices(model.device)):
            torch.manual_seed(self.seed * 1000 + round_index)
            output = model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True, temperature=self.temperature,
                top_p=0.95, max_new_tokens=self.max_new_tokens, num_return_sequences=self.n_proposals,
                pad_token_id=tokenizer.eos_token_id,
            )  # [n, L + new tokens]
        outputs = tokenizer.batch_decode(output[:, input_ids.shape[1]:], skip_special_tokens=True)
        logger.info("LM proposer %s: %d outputs for round %d (prompt %d tokens)",
                    self.lm.lm_id, len(outputs), round_index, input_ids.shape[1])
        return outputs


def chat_completions_url(url: str) -> str:
    """Return the endpoint for a base URL, appending ``/v1/chat/completions`` unless it is already there.

    Raises:
        ValueError: If the URL is not ``http://`` or ``https://``.
    """
    if not re.match(r"^https?://[^/\s]+", url):
        raise ValueError(f"invalid proposer url {url!r}; expected http://HOST[:PORT][/PATH] or https://...")
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/v1/chat/completions"


class _RejectRedirects(urllib.request.HTTPRedirectHandler):
    """Turns every redirect into an HTTPError, because urllib would resend the Authorization header to the new host."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class HTTPProposer:
    """Proposals from an OpenAI-compatible chat-completions endpoint, one request per proposal.

    The API key is read from the environment variable ``api_key_env`` at each request and is
    sent only in the ``Authorization`` header. It is never stored, logged or returned, and
    redirects are not followed. A failed request is logged and gives an empty output, which
    the loop counts as unparseable.

    Args:
        url: Base URL of the server, or the full ``.../chat/completions`` URL.
        model: Model name sent in the request.
        api_key_env: Name of the environment variable with the key; None sends no key.
        n_proposals: Requests per round.
        timeout_s: Timeout of each request in seconds.
    """

    def __init__(self, url: str, model: str, api_key_env: str | None, n_proposals: int, timeout_s: float = 60.0,
                 temperature: float = 0.8, max_tokens: int = 1024, context_entries: int = 6):
        self.endpoint = chat_completions_url(url)
        if api_key_env is not None and api_key_env not in os.environ:
            raise ValueError(f"environment variable {api_key_env} (proposer API key) is not set")
        self.model, self.api_key_env, self.n_proposals = model, api_key_env, n_proposals
        self.timeout_s, self.temperature, self.max_tokens = timeout_s, temperature, max_tokens
        self.context_entries = context_entries
        self._opener = urllib.request.build_opener(_RejectRedirects)

    def propose(self, archive: list[ArchiveEntry], previous: Proposal | None, round_index: int) -> list[str]:
        body = json.dumps({
            "model": self.model, "messages": build_messages(archive, previous, self.context_entries),
            "temperature": self.temperature, "max_tokens": self.max_tokens,
        }).encode("utf-8")
        outputs = [self._request(body, round_index, index) for index in range(self.n_proposals)]
        logger.info("HTTP proposer %s: %d of %d requests returned content for round %d",
                    self.endpoint, sum(bool(text) for text in outputs), len(outputs), round_index)
        return outputs

    def _request(self, body: bytes, round_index: int, index: int) -> str:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                record = json.loads(response.read(1 << 22).decode("utf-8"))
            content = record["choices"][0]["message"]["content"]
        except urllib.error.HTTPError as error:
            failure = f"HTTP status {error.code}"
        except (urllib.error.URLError, TimeoutError, OSError) as error:
            failure = f"request failed: {type(error).__name__}: {getattr(error, 'reason', error)}"
        except (ValueError, KeyError, IndexError, TypeError, RecursionError) as error:
            failure = f"invalid response: {type(error).__name__}: {error}"
        else:
            return content if isinstance(content, str) else ""
        if key:
            failure = failure.replace(key, "***")
        logger.warning("HTTP proposer %s, round %d proposal %d: %s", self.endpoint, round_index, index, failure)
        return ""


@dataclass(frozen=True)
class LossGenome:
    """A loss built from known terms, the unit the mutation proposer recombines.

    ``first`` and ``second`` are term names from :data:`TERMS`. ``mix`` is ``none`` (first
    term only), ``convex`` (``(1 - weight) * first + weight * second``) or ``gate``
    (DiscoPOP-style: ``weight = sigmoid(z / tau)`` per example). ``smoothing`` mixes in the
    loss with the labels flipped, and ``beta_scale`` multiplies ``beta``.
    """

    first: str
    second: str
    mix: str
    weight: float
    tau: float
    smoothing: float
    beta_scale: float

    def canonical(self) -> LossGenome:
        """Return the genome with the fields its mix ignores set to fixed values, so equal losses compare equal."""
        fields = asdict(self)
        if self.mix == "none" or self.second == self.first:
            fields.update(mix="none", second=self.first, weight=0.5, tau=0.1)
        elif self.mix == "convex":
            fields["tau"] = 0.1
        else:
            fields["weight"] = 0.5
        return LossGenome(**fields)

    def name(self) -> str:
        def number(value: float) -> str:
            return f"{value:g}".replace(".", "p").replace("-", "m")

        parts = [self.first]
        if self.mix == "convex":
            parts += [self.second, f"w{number(self.weight)}"]
        elif self.mix == "gate":
            parts += [self.second, f"gate{number(self.tau)}"]
        if self.smoothing:
            parts.append(f"ls{number(self.smoothing)}")
        if self.beta_scale != 1.0:
            parts.append(f"b{number(self.beta_scale)}")
        return "_".join(parts)


# Each term maps the scaled margin `z`, the margin `rho` and the scaled beta `b` to losses.
TERMS = {
    "logistic": "-F.logsigmoid({z})",
    "exponential": "torch.exp(-{z})",
    "hinge": "torch.relu(1 - {z})",
    "ipo": "({rho} - 1 / (2 * b)) ** 2",
    "sigmoid": "torch.sigmoid(-{z})",
    "softplus_hinge": "F.softplus(1 - {z})",
}
CHOICES: dict[str, tuple] = {
    "first": tuple(TERMS), "second": tuple(TERMS), "mix": ("none", "convex", "gate"),
    "weight": (0.25, 0.5, 0.75), "tau": (0.05, 0.1, 0.5, 1.0), "smoothing": (0.0, 0.0, 0.05, 0.1, 0.2),
    "beta_scale": (0.5, 1.0, 1.0, 2.0, 4.0),
}
_GENOME_MARKER = "genome="


def genome_code(genome: LossGenome) -> str:
    """Write the ``loss_fn`` source of a genome."""
    def combined(z: str, rho: str) -> str:
        first = TERMS[genome.first].format(z=z, rho=rho)
        if genome.mix == "none":
            return first
        second = TERMS[genome.second].format(z=z, rho=rho)
        weight = f"torch.sigmoid({z} / {genome.tau})" if genome.mix == "gate" else str(genome.weight)
        return f"(1 - {weight}) * {first} + {weight} * {second}"

    lines = [
        f"def loss_fn({', '.join(SIGNATURE)}):",
        f'    """{genome.name()}"""',
        "    rho = (policy_chosen_logps - policy_rejected_logps) - (reference_chosen_logps - reference_rejected_logps)",
        f"    b = beta * {genome.beta_scale}",
        "    z = b * rho",
        f"    losses = {combined('z', 'rho')}",
    ]
    if genome.smoothing:
        lines += [
            f"    flipped = {combined('(-z)', '(-rho)')}",
            f"    losses = {1 - genome.smoothing:g} * losses + {genome.smoothing:g} * flipped",
        ]
    lines.append("    return losses")
    return "\n".join(lines) + "\n"


def genome_from_thought(thought: str) -> LossGenome | None:
    """Read the genome the mutation proposer wrote at the end of a thought; None if there is none."""
    _, marker, encoded = thought.rpartition(_GENOME_MARKER)
    if not marker:
        return None
    try:
        genome = LossGenome(**json.loads(encoded))
    except (ValueError, TypeError):
        return None
    return genome if genome.first in TERMS and genome.second in TERMS else None


class MutationProposer:
    """Offline proposals that recombine known loss terms, for runs without an LLM.

    With ``previous`` (refine strategy) every proposal mutates one field of the previous
    genome. Otherwise each proposal is, with equal chance, a crossover of two of the best
    valid archive genomes plus a mutation, a mutation of one of them, or a random genome.
    Genomes already in the archive are avoided where possible. Round ``r`` draws from
    ``random.Random(seed * 1000 + r)``, so a resumed run proposes the same losses.
    """

    def __init__(self, n_proposals: int, seed: int = 0, parents: int = 4):
        self.n_proposals, self.seed, self.parents = n_proposals, seed, parents

    def propose(self, archive: list[ArchiveEntry], previous: Proposal | None, round_index: int) -> list[str]:
        rng = random.Random(self.seed * 1000 + round_index)
        ranked = sorted((entry for entry in archive if entry.ok), key=lambda entry: -entry.fitness)
        parents = [genome for genome in (genome_from_thought(e.thought) for e in ranked[: self.parents]) if genome]
        base = genome_from_thought(previous.thought) if previous is not None else None
        seen = {genome_from_thought(entry.thought) for entry in archive}
        outputs = []
        for _ in range(self.n_proposals):
            for _attempt in range(20):
                genome, origin = self._draw(rng, parents, base)
                if genome not in seen:
                    break
            seen.add(genome)
            thought = f"{origin}: {genome.name()}. {_GENOME_MARKER}{json.dumps(asdict(genome))}"
            outputs.append(json.dumps({"thought": thought, "name": genome.name(), "code": genome_code(genome)}))
        return outputs

    def _draw(self, rng: random.Random, parents: list[LossGenome], base: LossGenome | None) -> tuple[LossGenome, str]:
        if base is not None:
            return self._mutate(rng, base), "refined"
        choice = rng.random()
        if len(parents) >= 2 and choice < 1 / 3:
            mother, father = rng.sample(parents, 2)
            child = {key: rng.choice([value, getattr(father, key)]) for key, value in asdict(mother).items()}
            return self._mutate(rng, LossGenome(**child)), "crossover"
        if parents and choice < 2 / 3:
            return self._mutate(rng, rng.choice(parents)), "mutation"
        fields = {key: rng.choice(values) for key, values in CHOICES.items()}
        fields["second"] = rng.choice([term for term in TERMS if term != fields["first"]])
        return LossGenome(**fields).canonical(), "random"

    @staticmethod
    def _mutate(rng: random.Random, genome: LossGenome) -> LossGenome:
        """Change one field that affects the loss; a mix switched on gets a second term unlike the first."""
        keys = ["first", "mix", "smoothing", "beta_scale"]
        keys += {"none": [], "convex": ["second", "weight"], "gate": ["second", "tau"]}[genome.mix]
        key = rng.choice(keys)
        fields = asdict(genome)
        fields[key] = rng.choice([value for value in CHOICES[key] if value != fields[key]])
        if fields["mix"] != "none" and fields["second"] == fields["first"]:
            fields["second"] = rng.choice([term for term in TERMS if term != fields["first"]])
        return LossGenome(**fields).canonical()
