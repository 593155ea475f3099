"""Tests of the loss-discovery loop: proposers, JSON extraction, hostile proposals, resume, saved losses.

The hostile proposals are inputs for our own sandbox on this machine, and the HTTP proposer
only talks to a mock server bound to 127.0.0.1 that each test starts and stops.
"""

from __future__ import annotations

import json
import logging
import math
import textwrap
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
import torch

from mmalign.loops import discovery
from mmalign.loops.base import TreatmentContext, get_treatment
from mmalign.loops.discovery import (
    CandidateResult, DiscoveryLoop, LossDiscovery, parse_options, previous_proposal, save_best_losses,
)
from mmalign.loops.losses import PREFERENCE_LOSSES, dpo_loss, load_preference_loss
from mmalign.loops.proposers import (
    ArchiveEntry, HTTPProposer, LMProposer, MutationProposer, ProposalParseError, build_messages,
    chat_completions_url, extract_proposal, genome_from_thought,
)
from mmalign.loops.sandbox import SIGNATURE, Proposal, Sandbox, SandboxLimits, check_proposal, evaluate_in_sandbox

HEADER = f"def loss_fn({', '.join(SIGNATURE)}):\n"
RHO = "rho = (policy_chosen_logps - policy_rejected_logps) - (reference_chosen_logps - reference_rejected_logps)\n"
MEBIBYTE = 1024**2


def proposal_code(body: str) -> str:
    """Wrap an unindented function body in the required ``def loss_fn(...)`` line."""
    return HEADER + textwrap.indent(body.strip("\n") + "\n", "    ")


DPO_CODE = proposal_code(RHO + "return -F.logsigmoid(beta * rho)")
HINGE_CODE = proposal_code(RHO + "return torch.relu(1 - beta * rho)")


def output(name: str, code: str, thought: str = "") -> str:
    return json.dumps({"thought": thought or f"try {name}", "name": name, "code": code})


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(SandboxLimits(cpu_seconds=1, wall_seconds=30.0, memory_bytes=512 * MEBIBYTE)) as box:
        yield box


@dataclass
class ScriptedProposer:
    """Returns fixed outputs per round and records what each call received."""

    rounds: dict[int, list[str]]
    calls: list[tuple[int, Proposal | None, int]] = field(default_factory=list)

    def propose(self, archive, previous, round_index):
        self.calls.append((round_index, previous, len(archive)))
        return self.rounds.get(round_index, [output(f"dpo_copy_{round_index}", DPO_CODE)])


def far_from_reference() -> dict[str, torch.Tensor]:
    """Log-probabilities with a margin of about -10000, far outside the validation inputs."""
    values = torch.tensor([[-10000.0] * 4, [-1.0] * 4, [-1.0] * 4, [-1.0] * 4], dtype=torch.float64)
    return dict(zip(SIGNATURE[:4], values, strict=True))


def sandbox_trainer(sandbox: Sandbox, calls: list[str]):
    """Stand-in for the adapter training: evaluates the loss in the sandbox on fixed extreme inputs."""
    def train(proposal: Proposal) -> CandidateResult:
        calls.append(proposal.name)
        losses, _ = evaluate_in_sandbox(proposal.code, far_from_reference(), beta=0.1, sandbox=sandbox)
        return CandidateResult(-float(losses.mean()) / 1000.0, {"mean_loss": float(losses.mean())})
    return train


# JSON extraction and prompts: no model needed.

MESSY_OUTPUTS = {
    "preamble_and_fence": "Sure! Here is my idea.\n```json\n" + output("my_loss", DPO_CODE) + "\n```\nHope it helps.",
    "raw_newlines_in_string": 'Answer: {"thought": "hinge", "name": "hinge_two", "code": "' + HINGE_CODE + '"}',
    "stray_brace_first": "I think {maybe} this works: " + output("late_object", DPO_CODE),
    "camel_case_name": output("SmoothHinge Loss", DPO_CODE),
    "imports_and_code_fence": output("with_imports", "```python\nimport torch\nimport torch.nn.functional as F\n" + DPO_CODE + "```"),
}


@pytest.mark.parametrize("case", sorted(MESSY_OUTPUTS))
def test_extract_proposal_messy_output(case):
    proposal = extract_proposal(MESSY_OUTPUTS[case])
    assert proposal.code.startswith("def loss_fn(")
    assert check_proposal(proposal.code) == []
    assert proposal.name == proposal.name.lower()
    assert " " not in proposal.name


def test_extract_proposal_normalizes_name():
    assert extract_proposal(MESSY_OUTPUTS["camel_case_name"]).name == "smooth_hinge_loss"
    assert extract_proposal(output("3rd--try!", DPO_CODE)).name == "rd_try"
    assert extract_proposal(json.dumps({"code": DPO_CODE})).name == "loss"


@pytest.mark.parametrize("text, kind", [
    ("", "empty_output"),
    ("   \n", "empty_output"),
    ("I cannot help with that.", "no_json"),
    ("{'name': 'single quotes', 'code': 'x'}", "no_json"),
    ('{"thought": "no code here", "name": "x"}', "missing_code"),
    ('{"thought": "t", "name": "x", "code": 42}', "missing_code"),
    ('{"a":' * 4000, "no_json"),
])
def test_extract_proposal_failure_kinds(text, kind):
    with pytest.raises(ProposalParseError) as error:
        extract_proposal(text)
    assert error.value.kind == kind


def test_build_messages_feeds_back_archive():
    archive = [
        ArchiveEntry(0, 0, "good", "t", DPO_CODE, "ok", fitness=0.5),
        ArchiveEntry(0, 1, "bad", "t", "def loss_fn(): pass", "rejected_static", "line 1: the signature must be ..."),
        ArchiveEntry(0, 2, "unparsed_r0_2", "", "", "unparseable", "no_json: no JSON object found", raw="nonsense"),
    ]
    messages = build_messages(archive, None, context_entries=6)
    assert [message["role"] for message in messages] == ["user"] + ["assistant", "user"] * 3
    assert messages[2]["content"] == "Fitness: 0.5000. Please generate the next one."
    assert "rejected_static" in messages[4]["content"]
    assert messages[5]["content"] == "nonsense"
    assert "could not be parsed" in messages[6]["content"]
    assert len(build_messages(archive, None, context_entries=1)) == 3
    refine = build_messages(archive, Proposal("t", "good", DPO_CODE), context_entries=6)
    assert "Improve this previous proposal" in refine[-1]["content"]
    assert "logsigmoid" in refine[-1]["content"]


def test_options_reject_invalid_fields():
    with pytest.raises(ValueError, match="round"):
        parse_options({"round": 3})
    with pytest.raises(ValueError, match="needs url and model"):
        parse_options({"proposer": "http"})
    with pytest.raises(ValueError, match="invalid fitness metric"):
        parse_options({"fitness_weights": {"accuracy": 1.0}})
    assert parse_options({}).proposer == "mutation"


def test_treatment_registered():
    assert isinstance(get_treatment("loss-discovery"), LossDiscovery)


# Proposers.

def test_mutation_proposer_yields_valid_code(sandbox):
    proposer = MutationProposer(n_proposals=6, seed=3)
    outputs = proposer.propose([], None, 0)
    assert outputs == MutationProposer(n_proposals=6, seed=3).propose([], None, 0)
    proposals = [extract_proposal(text) for text in outputs]
    assert len({proposal.name for proposal in proposals}) == 6
    for proposal in proposals:
        assert genome_from_thought(proposal.thought) is not None
        result = sandbox.validate(proposal.code)
        assert result.ok, (proposal.name, result)


def test_mutation_proposer_refines_previous():
    first = extract_proposal(MutationProposer(1, seed=0).propose([], None, 0)[0])
    parent = genome_from_thought(first.thought)
    for text in MutationProposer(4, seed=1).propose([], first, 1):
        child = genome_from_thought(extract_proposal(text).thought)
        assert child != parent
        # One mutation changes at most one of these; the others follow from the mix.
        changed = [key for key in ("first", "mix", "smoothing", "beta_scale") if getattr(child, key) != getattr(parent, key)]
        assert len(changed) <= 1, changed


class StubTokenizer:
    """Records the chat messages; encodes every prompt as three tokens and decodes ids as numbers."""

    chat_template = "stub"
    eos_token_id = 0

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        self.messages = messages
        return "prompt"

    def __call__(self, text, add_special_tokens, return_tensors):
        return SimpleNamespace(input_ids=torch.tensor([[5, 6, 7]]))

    def batch_decode(self, ids, skip_special_tokens):
        return [" ".join(str(value) for value in row.tolist()) for row in ids]


class StubModel:
    """Appends two new tokens per returned sequence and records the generate arguments."""

    device = torch.device("cpu")

    def generate(self, input_ids, num_return_sequences, **kwargs):
        self.kwargs = {"num_return_sequences": num_return_sequences, **kwargs}
        new_tokens = 100 + torch.arange(2 * num_return_sequences).reshape(num_return_sequences, 2)
        return torch.cat([input_ids.expand(num_return_sequences, -1), new_tokens], dim=1)


def test_lm_proposer_prompts_with_archive():
    lm = SimpleNamespace(lm_id="stub", tokenizer=StubTokenizer(), model=StubModel())
    archive = [ArchiveEntry(0, 0, "good", "t", DPO_CODE, "ok", fitness=0.5)]
    outputs = LMProposer(lm, n_proposals=2, seed=0).propose(archive, None, 1)
    assert outputs == ["100 101", "102 103"]
    assert lm.tokenizer.messages[-1]["content"] == "Fitness: 0.5000. Please generate the next one."
    assert lm.model.kwargs["num_return_sequences"] == 2
    assert lm.model.kwargs["do_sample"] is True
    with pytest.raises(ValueError, match="no chat template"):
        LMProposer(SimpleNamespace(lm_id="base", tokenizer=SimpleNamespace(chat_template=None), model=None), 1)


@pytest.mark.slow
def test_lm_proposer_returns_seeded_outputs(smollm2):
    proposer = LMProposer(smollm2, n_proposals=2, max_new_tokens=8, seed=0)
    first = proposer.propose([], None, 0)
    assert len(first) == 2
    assert all(isinstance(text, str) for text in first)
    assert proposer.propose([], None, 0) == first


def test_chat_completions_url():
    assert chat_completions_url("http://127.0.0.1:8000/") == "http://127.0.0.1:8000/v1/chat/completions"
    assert chat_completions_url("http://127.0.0.1:8000/v1/chat/completions") == "http://127.0.0.1:8000/v1/chat/completions"
    with pytest.raises(ValueError, match="invalid proposer url"):
        chat_completions_url("file:///etc/passwd")


class ChatHandler(BaseHTTPRequestHandler):
    """A chat-completions endpoint that records requests and replies from the server's reply queue."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
        status, content = self.server.replies.pop(0) if self.server.replies else (200, output("served_dpo", DPO_CODE))
        if status == 200:
            data = json.dumps({"choices": [{"message": {"role": "assistant", "content": "Here you go:\n" + content}}]})
        else:  # an error body that echoes the credentials, as some servers do
            data = json.dumps({"error": f"rejected {self.headers.get('Authorization')}"})
        encoded = data.encode("utf-8")
        self.send_response(status)
        if status in (302, 307):
            self.send_header("Location", "/elsewhere")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(encoded)))
        self.end_headers()
        self.wfile.write(encoded)

    def log_message(self, *args):
        pass


@pytest.fixture
def chat_server(monkeypatch):
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    server = ThreadingHTTPServer(("127.0.0.1", 0), ChatHandler)
    server.requests, server.replies = [], []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


SECRET = "sk-test-0123456789abcdef"


def test_http_proposer_mock_server(chat_server, sandbox, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("DISCOVERY_TEST_KEY", SECRET)
    chat_server.replies = [(200, output("served_hinge", HINGE_CODE)), (500, ""), (200, "no json at all")]
    proposer = HTTPProposer(f"http://127.0.0.1:{chat_server.server_address[1]}", "mock-model", "DISCOVERY_TEST_KEY",
                            n_proposals=2, timeout_s=10.0)
    calls: list[str] = []
    loop = DiscoveryLoop(sandbox_trainer(sandbox, calls), sandbox, tmp_path / "archive.json", rounds=2)
    entries = loop.run(proposer)

    assert len(chat_server.requests) == 4
    request = chat_server.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == f"Bearer {SECRET}"
    assert request["body"]["model"] == "mock-model"
    assert [entry.category for entry in entries] == ["ok", "unparseable", "unparseable", "ok"]
    assert entries[1].reason.startswith("empty_output")
    assert entries[2].reason.startswith("no_json")
    feedback = [message["content"] for message in chat_server.requests[2]["body"]["messages"]]
    assert any(text.startswith("Fitness: ") and text.endswith("Please generate the next one.") for text in feedback)
    assert "HTTP status 500" in caplog.text
    assert SECRET not in caplog.text
    assert SECRET not in (tmp_path / "archive.json").read_text()
    assert SECRET not in repr(vars(proposer))


def test_http_proposer_rejects_redirects(chat_server, monkeypatch, caplog):
    monkeypatch.setenv("DISCOVERY_TEST_KEY", SECRET)
    chat_server.replies = [(307, ""), (302, "")]
    proposer = HTTPProposer(f"http://127.0.0.1:{chat_server.server_address[1]}/v1/chat/completions", "mock-model",
                            "DISCOVERY_TEST_KEY", n_proposals=2, timeout_s=10.0)
    assert proposer.propose([], None, 0) == ["", ""]
    assert [request["path"] for request in chat_server.requests] == ["/v1/chat/completions"] * 2
    assert "HTTP status 307" in caplog.text
    assert SECRET not in caplog.text


def test_http_proposer_missing_key_variable(monkeypatch):
    monkeypatch.delenv("DISCOVERY_TEST_MISSING", raising=False)
    with pytest.raises(ValueError, match="DISCOVERY_TEST_MISSING"):
        HTTPProposer("http://127.0.0.1:9", "m", "DISCOVERY_TEST_MISSING", n_proposals=1)


# The loop with hostile proposals, each rejected or stopped with a recorded category and reason.

SLOW_CODE = proposal_code(
    "x = policy_chosen_logps.detach().repeat(100000)\n"
    "for i in range(1000):\n    for j in range(10):\n        x = torch.exp(torch.sin(x))\n"
    "return policy_chosen_logps + x[:10]"
)
HOSTILE = {
    "import_os": ("import os\n" + DPO_CODE, "rejected_static", "exactly one top-level statement"),
    "open_file": (proposal_code("data = open('/etc/passwd')\nreturn beta"), "rejected_static", "unknown name open"),
    "socket": (proposal_code("connection = socket.socket()\nreturn beta"), "rejected_static", "unknown name socket"),
    "infinite_loop": (proposal_code("while True:\n    pass\nreturn beta"), "rejected_static", "While is not allowed"),
    "subclasses_escape": (proposal_code("c = ().__class__.__bases__[0].__subclasses__()\nreturn beta"), "rejected_static",
                          "starting with '_'"),
    "recursion": (proposal_code(f"return loss_fn({', '.join(SIGNATURE)})"), "rejected_static", "unknown name loss_fn"),
    "deep_nesting": (proposal_code("x = " + "-" * 300 + "beta\nreturn x"), "rejected_static", "nest deeper than"),
    "huge_allocation": (proposal_code("x = policy_chosen_logps.repeat(20000000)\nreturn x[:10]"), "memory", "allocate"),
    "cpu_burn": (SLOW_CODE, "timeout", "SIGXCPU"),
    "quadratic_memory": (proposal_code(
        RHO + "outer = policy_chosen_logps.unsqueeze(0) * policy_rejected_logps.unsqueeze(1)\n"
        "return outer.mean(dim=0) * 0.0 - F.logsigmoid(beta * rho)"), "memory", "at 65536 examples"),
    "exp_overflow_in_training": (proposal_code(RHO + "return torch.exp(-beta * rho)"), "non_finite", "in training"),
    "scalar_loss": (proposal_code(RHO + "return (beta * rho).mean()"), "wrong_shape", "shape"),
    "detached": (proposal_code(RHO + "return (beta * rho).detach()"), "no_gradient", "do not depend"),
    "zero_division": (proposal_code("x = 1 / 0\nreturn policy_chosen_logps"), "crash", "ZeroDivisionError"),
}


def test_hostile_proposals_recorded_and_loop_continues(sandbox, tmp_path):
    names = sorted(HOSTILE)
    proposer = ScriptedProposer({0: [output(name, HOSTILE[name][0]) for name in names] + ["only prose, no JSON"]})
    calls: list[str] = []
    loop = DiscoveryLoop(sandbox_trainer(sandbox, calls), sandbox, tmp_path / "archive.json", rounds=2)
    entries = loop.run(proposer)

    by_name = {entry.name: entry for entry in entries}
    for name in names:
        _, category, message = HOSTILE[name]
        assert by_name[name].category == category, (name, by_name[name].reason)
        assert message in by_name[name].reason, (name, by_name[name].reason)
        assert by_name[name].fitness is None
    assert entries[len(names)].category == "unparseable"
    assert calls == ["exp_overflow_in_training", "dpo_copy_1"]
    assert entries[-1].ok
    assert entries[-1].runtime_ms > 0

    archive = json.loads((tmp_path / "archive.json").read_text())
    assert archive["completed_rounds"] == 2
    first_round = archive["rounds"][0]
    assert first_round["n_valid"] == 0
    assert first_round["categories"]["rejected_static"] == 7
    assert first_round["parse_failures"] == {"no_json": 1}
    assert archive["rounds"][1]["valid_rate"] == 1.0
    assert {"round", "name", "thought", "code", "category", "reason", "fitness", "runtime_ms"} <= set(archive["entries"][0])


# Resume, refine and saved losses.

def test_resume_skips_finished_rounds(sandbox, tmp_path):
    path = tmp_path / "archive.json"
    first = ScriptedProposer({})
    entries = DiscoveryLoop(sandbox_trainer(sandbox, []), sandbox, path, rounds=2, fingerprint="a").run(first)
    assert [call[0] for call in first.calls] == [0, 1]

    second = ScriptedProposer({})
    resumed = DiscoveryLoop(sandbox_trainer(sandbox, []), sandbox, path, rounds=3, fingerprint="a")
    assert resumed.pending_rounds == [2]
    more = resumed.run(second)
    assert [call[0] for call in second.calls] == [2]
    assert second.calls[0][2] == len(entries)
    assert [entry.name for entry in more[: len(entries)]] == [entry.name for entry in entries]
    assert json.loads(path.read_text())["completed_rounds"] == 3
    with pytest.raises(ValueError, match="another checkpoint, seed or options"):
        DiscoveryLoop(sandbox_trainer(sandbox, []), sandbox, path, rounds=3, fingerprint="b")


def test_refine_passes_previous_code(sandbox, tmp_path):
    proposer = ScriptedProposer({0: [output("dpo_base", DPO_CODE), output("hinge_base", HINGE_CODE), "garbage"]})
    loop = DiscoveryLoop(sandbox_trainer(sandbox, []), sandbox, tmp_path / "archive.json", rounds=2, strategy="refine")
    entries = loop.run(proposer)
    assert proposer.calls[0][1] is None
    best = max((entry for entry in entries[:3] if entry.ok), key=lambda entry: entry.fitness)
    assert proposer.calls[1][1] == Proposal(best.thought, best.name, best.code)

    free = ScriptedProposer({0: [output("dpo_base", DPO_CODE)]})
    DiscoveryLoop(sandbox_trainer(sandbox, []), sandbox, tmp_path / "free.json", rounds=2).run(free)
    assert [call[1] for call in free.calls] == [None, None]


def test_previous_proposal_falls_back_to_last_invalid():
    entries = [ArchiveEntry(0, 0, "broken", "t", "def loss_fn(): pass", "rejected_static", "signature")]
    assert previous_proposal(entries, 1).name == "broken"
    assert previous_proposal(entries, 0) is None


def test_best_loss_saved_and_loads(sandbox, tmp_path):
    entries = [
        ArchiveEntry(0, 0, "found_hinge", "t", HINGE_CODE, "ok", fitness=0.1),
        ArchiveEntry(0, 1, "found_dpo", "t", DPO_CODE, "ok", fitness=0.7),
        ArchiveEntry(0, 2, "broken", "t", "x", "crash", "boom"),
    ]
    paths = save_best_losses(entries, tmp_path / "losses", k=1)
    assert [path.name for path in paths] == ["found_dpo.json"]
    try:
        spec = load_preference_loss(paths[0], sandbox=sandbox, default_beta=0.1)
        logps = [-1.0 - 10.0 * torch.rand(5, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i in range(4)]
        expected = dpo_loss(*logps, beta=0.1)
        assert torch.allclose(spec.bind()(*logps), expected)
    finally:
        PREFERENCE_LOSSES.pop("found_dpo", None)


# The treatment end to end on a small stand-in run: real SmolLM2, random vision features.

D_VISION = 32
N_ENCODER_TOKENS = 17
CAPTIONS = ["a red apple", "a blue car on a road", "a small dog", "a wooden chair", "a green tree", "a yellow sun",
            "a white cat", "a tall house", "an old boat", "a black hat"]


@dataclass
class StandInRun:
    """The parts of `mmalign.pipeline.RunContext` the treatment reads."""

    lm: object
    tokens: torch.Tensor
    train_rows: list[int] = field(default_factory=lambda: list(range(8)))

    def __post_init__(self) -> None:
        from mmalign.adapters.compose import build_prompt
        from mmalign.config import EvalConfig

        self.prompt = build_prompt(self.lm)
        self.dataset = SimpleNamespace(items=[SimpleNamespace(caption=caption) for caption in CAPTIONS])
        self.config = SimpleNamespace(train=SimpleNamespace(max_caption_tokens=12), eval=EvalConfig(batch_size=4))
        self.encoder = SimpleNamespace(describe=lambda: {"encoder_id": "random", "d_model": D_VISION})

    def checkpoint_metadata(self) -> dict[str, object]:
        from mmalign.lm import describe_lm

        return {"vision_encoder": self.encoder.describe(), "lm": describe_lm(self.lm)}


def small_adapter():
    from mmalign.adapters.registry import build_adapter

    torch.manual_seed(0)
    return build_adapter({"kind": "linear", "d_vision": D_VISION, "d_lm": 576, "pooled_grid": 2, "keep_cls": True,
                          "has_cls_token": True, "n_encoder_tokens": N_ENCODER_TOKENS})


def test_sandboxed_training_lowers_dpo_loss(smollm2, sandbox):
    import copy

    from mmalign.loops.self_rewarding import caption_logprobs

    run = StandInRun(smollm2, torch.randn(len(CAPTIONS), N_ENCODER_TOKENS, D_VISION, generator=torch.Generator().manual_seed(0)))
    start = small_adapter().requires_grad_(False)
    options = parse_options({"inner_steps": 3, "inner_batch_size": 3, "inner_lr": 1e-3, "rejected": "shuffled"})
    pairs = discovery.build_pairs(run, start, [0, 1, 2], options, seed=0)
    assert sorted(pairs.rejected) == sorted(pairs.chosen)  # another image's caption for each image
    assert all(rejected != chosen for rejected, chosen in zip(pairs.rejected, pairs.chosen))
    policy = copy.deepcopy(start).requires_grad_(True)
    stats = discovery.train_with_loss(run, policy, pairs, DPO_CODE, options, sandbox, seed=0)
    assert stats["preference_loss_first_step"] == pytest.approx(math.log(2), abs=1e-4)  # policy equals reference

    with torch.no_grad():
        chosen = caption_logprobs(smollm2, policy, pairs.vision_tokens, pairs.chosen, run.prompt, 12)
        rejected = caption_logprobs(smollm2, policy, pairs.vision_tokens, pairs.rejected, run.prompt, 12)
    after = dpo_loss(chosen, rejected, pairs.reference_chosen, pairs.reference_rejected, beta=options.beta).mean()
    assert float(after) < math.log(2) - 0.01


def test_treatment_end_to_end_and_resume(smollm2, tmp_path, monkeypatch):
    from mmalign.adapters.checkpoint import save_checkpoint
    from mmalign.config import ProbesConfig
    from mmalign.probes.sae import fit_sae, hook_name

    run = StandInRun(smollm2, torch.randn(len(CAPTIONS), N_ENCODER_TOKENS, D_VISION, generator=torch.Generator().manual_seed(0)))
    start = save_checkpoint(small_adapter(), tmp_path / "start", run.checkpoint_metadata())
    activations = torch.randn(64, 576)
    probes = {layer: fit_sae(activations, ProbesConfig(d_sae=16, steps=2, batch_tokens=32), 0,
                             {"model_name": smollm2.lm_id, "hook_name": hook_name(layer)}) for layer in (3, 6)}
    monkeypatch.setattr(discovery, "probe_stage", lambda _run: (probes, tmp_path, 0))
    options = {"rounds": 1, "proposals_per_round": 2, "inner_steps": 2, "inner_batch_size": 2, "pairs": 3,
               "fitness_images": 4, "rejected": "shuffled", "save_best": 1, "inner_lr": 1e-3}
    output_dir = tmp_path / "treatment"

    treated = LossDiscovery().apply(start, TreatmentContext(run, output_dir, options, 0))
    archive = json.loads((output_dir / "archive.json").read_text())
    assert math.isfinite(archive["baseline"]["fitness"])
    assert len(treated) == 1
    best = treated[0]
    assert best.name.startswith("loss-discovery/")
    assert (best.directory / "adapter.safetensors").is_file()
    assert (best.directory / "loss.json").is_file()
    assert {"fitness", "valid_rate", "caption_loss", "cka_linear"} <= set(best.metrics)
    loss_files = list((output_dir / "losses").glob("*.json"))
    assert [path.stem for path in loss_files] == [best.name.removeprefix("loss-discovery/")]
    assert len(list((output_dir / "candidates").iterdir())) == 1

    def fail(*args, **kwargs):
        raise AssertionError("a finished round was run again")

    monkeypatch.setattr(discovery.CandidateRunner, "__call__", fail)
    monkeypatch.setattr(MutationProposer, "propose", fail)
    again = LossDiscovery().apply(start, TreatmentContext(run, output_dir, options, 0))
    assert [item.name for item in again] == [best.name]
