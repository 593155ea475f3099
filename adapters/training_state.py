"""Optimizer and scheduler state saved beside a checkpoint, without pickle.

Tensors go to `training_state.safetensors`; counters and hyperparameters go to
`training_state.json`. Together with the step number they are all a resumed run needs,
because the data order and dropout randomness are derived from (seed, step).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _to_jsonable(item) for key, item in value.items()}
    return value


def write_training_state(
    directory: Path, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, step: int, extra: dict[str, Any]
) -> None:
    """Write optimizer and scheduler state into an (unpublished, staging) checkpoint directory."""
    optimizer_state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, state in optimizer_state["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                tensors[f"optimizer.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = _to_jsonable(value)
    scheduler_state = {key: value for key, value in scheduler.state_dict().items() if key != "lr_lambdas"}
    record = {
        "step": step,
        "optimizer_param_groups": _to_jsonable(optimizer_state["param_groups"]),
        "optimizer_scalars": scalars,
        "scheduler": _to_jsonable(scheduler_state),
        **extra,
    }
    save_file(tensors, directory / STATE_TENSORS)
    (directory / STATE_JSON).write_text(json.dumps(record, indent=2), encoding="utf-8")


def read_training_state(
    directory: Path, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler
) -> dict[str, Any]:
    """Restore optimizer and scheduler state written by `write_training_state`; return the JSON record."""
    record = json.loads((directory / STATE_JSON).read_text(encoding="utf-8"))
    tensors = load_file(directory / STATE_TENSORS)
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, values in record["optimizer_scalars"].items():
        for name, value in values.items():
            # AdamW keeps `step` as a float32 scalar tensor on CPU.
            state.setdefault(int(index), {})[name] = torch.tensor(value, dtype=torch.float32) if name == "step" else value
    optimizer.load_state_dict({"state": state, "param_groups": record["optimizer_param_groups"]})
    # LambdaLR stores plain-function lambdas as None; the schedule itself is rebuilt from the config.
    scheduler.load_state_dict({**record["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    return record


def has_training_state(directory: Path) -> bool:
    return (directory / STATE_JSON).is_file() and (directory / STATE_TENSORS).is_file()
