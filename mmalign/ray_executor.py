"""Batch evaluation on a Ray cluster: each worker loads the frozen models once and takes a share.

Workers write their results into the run's store (`results/parts/`), so every worker
must see the run directory, which is automatic on one machine. On a multi-node cluster,
the run directory and the cache (`MMALIGN_CACHE_DIR`) must be on a shared filesystem at
the same path on every node. Probes are fitted (or loaded) by the driver before the workers
start, so workers only read them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from mmalign.config import RunConfig

logger = logging.getLogger("mmalign.evaluate")


class _Worker:
    """One Ray actor: frozen models, probes, features and an evaluator, loaded once."""

    def __init__(self, config_data: dict, run_dir: str) -> None:
        from mmalign.batch_eval import ResultsStore, metric_set_hash
        from mmalign.commands import _evaluator
        from mmalign.config import parse_config
        from mmalign.lm import describe_lm
        from mmalign.pipeline import prepare_run, probe_stage

        self.context = prepare_run(parse_config(config_data, "ray driver"), Path(run_dir))
        probes, probe_dir, _ = probe_stage(self.context)
        self.evaluator = _evaluator(self.context, probes)
        self.store = ResultsStore(self.context.run_dir / "results")
        self.metric_set = metric_set_hash(self.context.config, probe_dir, self.context.dataset.fingerprint(), self.context.val_rows)
        self.expect_vision = self.context.encoder.describe()
        self.expect_lm = describe_lm(self.context.lm)

    def evaluate(self, checkpoints: list[tuple[str, str, str]]) -> dict[str, float]:
        from mmalign.batch_eval import evaluate_checkpoints

        items = [(name, Path(path), treatment) for name, path, treatment in checkpoints]
        return evaluate_checkpoints(
            self.evaluator, self.context.tokens[self.context.val_rows], items, self.store,
            self.metric_set, self.expect_vision, self.expect_lm,
        )

    def pid(self) -> int:
        return os.getpid()


def evaluate_with_ray(
    config: RunConfig, run_dir: Path, checkpoints: list[tuple[str, Path, str]], workers: int, address: str | None = None
) -> list[int]:
    """Evaluate checkpoints on Ray actors, round-robin shares; return the worker process ids.

    Args:
        address: A running cluster (`ray://HOST:10001` or `auto`); None starts a local
            Ray instance bound to 127.0.0.1.
    """
    try:
        import ray
    except ImportError:
        raise RuntimeError("--executor ray needs Ray: install it with `.venv/bin/pip install 'ray>=2.9'`") from None

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started_here = not ray.is_initialized()
    if started_here:
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            ray.init(num_cpus=max(workers, 1), include_dashboard=False, _node_ip_address="127.0.0.1",
                     logging_level=logging.WARNING, runtime_env={"env_vars": {"MMALIGN_CACHE_DIR": os.environ.get("MMALIGN_CACHE_DIR", "")}}
                     if os.environ.get("MMALIGN_CACHE_DIR") else None)
    try:
        actor_class = ray.remote(num_cpus=1)(_Worker)
        actors = [actor_class.remote(config.model_dump(), str(run_dir)) for _ in range(workers)]
        shares = [[(name, str(path), treatment) for name, path, treatment in checkpoints[index::workers]] for index in range(workers)]
        logger.info("ray: %d workers, %s checkpoints each", workers, [len(share) for share in shares])
        ray.get([actor.evaluate.remote(share) for actor, share in zip(actors, shares) if share])
        return ray.get([actor.pid.remote() for actor in actors])
    finally:
        if started_here:
            ray.shutdown()
