"""Adapter training: exact resume after SIGKILL, clean SIGINT, divergence, full disk, two processes."""

import errno
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmalign.adapters import checkpoint as checkpoint_module
from mmalign.adapters.checkpoint import save_checkpoint
from mmalign.adapters.compose import build_prompt
from mmalign.adapters.linear import LinearAdapter
from mmalign.adapters.train import TrainingDivergedError, TrainingSetup, train_adapter
from mmalign.config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent


def _write_config(directory: Path, **train) -> Path:
    config = yaml.safe_load((ROOT / "configs" / "quick.yaml").read_text())
    config["train"].update({"steps": 24, "save_every": 4, "eval_every": 0, **train})
    path = directory / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _train_command(config: Path, output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mmalign", "train", str(config), "--output", str(output), *extra]


def _final_weights(output: Path) -> dict[str, torch.Tensor]:
    return load_file(output / "quick" / "checkpoints" / "final" / "adapter.safetensors")


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"training exited early with code {process.returncode}"
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    directory = tmp_path_factory.mktemp("uninterrupted")
    config = _write_config(directory)
    subprocess.run(_train_command(config, directory / "runs"), check=True, capture_output=True, timeout=600)
    return config, _final_weights(directory / "runs")


def test_resume_after_sigkill_is_bitwise_identical(tmp_path, uninterrupted):
    config, expected = uninterrupted
    output = tmp_path / "runs"
    process = subprocess.Popen(_train_command(config, output), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(output / "quick" / "checkpoints" / "step_000008", process)
    process.kill()
    process.wait()
    assert not (output / "quick" / "checkpoints" / "final").exists()

    subprocess.run(_train_command(config, output, "--resume"), check=True, capture_output=True, timeout=600)
    resumed = _final_weights(output)
    assert resumed.keys() == expected.keys()
    for name in expected:
        assert torch.equal(resumed[name], expected[name]), name


def test_sigint_saves_and_exits_cleanly(tmp_path, uninterrupted):
    config, expected = uninterrupted
    output = tmp_path / "runs"
    process = subprocess.Popen(_train_command(config, output), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(output / "quick" / "checkpoints" / "step_000004", process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "continue with --resume" in stderr
    steps = sorted(p.name for p in (output / "quick" / "checkpoints").glob("step_*"))
    assert steps, "no checkpoint saved on SIGINT"

    subprocess.run(_train_command(config, output, "--resume"), check=True, capture_output=True, timeout=600)
    for name, tensor in _final_weights(output).items():
        assert torch.equal(tensor, expected[name]), name


def _setup(lm, directory: Path) -> TrainingSetup:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(8, 5, 16, generator=generator)
    captions = ["A cat.", "A dog.", "A red bus.", "A tree.", "An apple.", "A boat.", "A hat.", "A shoe."]
    return TrainingSetup(lm, tokens, captions, tokens[:2], captions[:2], build_prompt(lm), directory / "checkpoints", {}, 0)


def _adapter(lm) -> LinearAdapter:
    return LinearAdapter(16, lm.d_model, pooled_grid=None, keep_cls=True, has_cls_token=True, n_encoder_tokens=5)


def test_nan_loss_names_step_and_checkpoint(smollm2, tmp_path, monkeypatch):
    from mmalign.adapters import train as train_module

    real_loss = train_module.caption_loss
    calls = {"n": 0}

    def poisoned(lm, batch):
        calls["n"] += 1
        loss, count = real_loss(lm, batch)
        return (loss * float("nan"), count) if calls["n"] >= 3 else (loss, count)

    monkeypatch.setattr(train_module, "caption_loss", poisoned)
    config = TrainConfig(steps=5, batch_size=2, save_every=2, eval_every=0)
    with pytest.raises(TrainingDivergedError, match=r"step 3.*step_000002"):
        train_adapter(_adapter(smollm2), _setup(smollm2, tmp_path), config)


def test_full_disk_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "save_file", no_space)
    adapter = LinearAdapter(4, 3, pooled_grid=None, keep_cls=False, has_cls_token=False, n_encoder_tokens=4)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(adapter, tmp_path / "step_000010", {})
    assert list(tmp_path.iterdir()) == []


def test_full_disk_keeps_previous_checkpoint(tmp_path, monkeypatch):
    adapter = LinearAdapter(4, 3, pooled_grid=None, keep_cls=False, has_cls_token=False, n_encoder_tokens=4)
    save_checkpoint(adapter, tmp_path / "final", {"step": 1})
    monkeypatch.setattr(checkpoint_module, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(OSError):
        save_checkpoint(adapter, tmp_path / "final", {"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert (tmp_path / "final" / "adapter.safetensors").is_file()


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_process_data_parallel_run(tmp_path):
    # accelerate launch starts multi-GPU jobs; on CPU the same Accelerate DDP code path
    # runs under torchrun, which sets the process-group variables Accelerator reads.
    config = _write_config(tmp_path, steps=6, save_every=3, batch_size=4)
    output = tmp_path / "runs"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        "-m", "mmalign", "train", str(config), "--output", str(output),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoints = sorted(p.name for p in (output / "quick" / "checkpoints").iterdir())
    assert checkpoints == ["final", "step_000003", "step_000006"]
    assert "training on 2 processes (DistributedType.MULTI_CPU)" in (output / "quick" / "run.log").read_text()
