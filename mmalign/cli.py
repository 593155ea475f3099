"""Command-line interface: `mmalign run CONFIG [--output DIR]`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mmalign.config import ConfigError, load_config

logger = logging.getLogger("mmalign")


def _configure_logging(level: str, log_file: Path | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    for handler in handlers:
        handler.setFormatter(formatter)
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = False


def _command_run(args: argparse.Namespace) -> int:
    overrides = {"output_dir": str(args.output)} if args.output else {}
    config = load_config(args.config, overrides)
    run_dir = Path(config.output_dir) / config.name
    _configure_logging(args.log_level, run_dir / "run.log")
    logger.info("run %s: writing to %s", config.name, run_dir)

    from mmalign.pipeline import run_pipeline

    result = run_pipeline(config, run_dir)
    timings = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in result.stage_seconds.items())
    logger.info("stage wall times: %s", timings)
    print(f"report:  {result.report_path}")
    print(f"results: {result.results_path}")
    return 0


def _command_train(args: argparse.Namespace) -> int:
    overrides = {"output_dir": str(args.output)} if args.output else {}
    config = load_config(args.config, overrides)
    run_dir = Path(config.output_dir) / config.name

    from accelerate import Accelerator

    from mmalign.adapters.train import TrainingInterrupted
    from mmalign.pipeline import control_losses, prepare_run, train_stage

    accelerator = Accelerator(cpu=not torch_cuda_available())
    is_main = accelerator.is_main_process
    _configure_logging(args.log_level if is_main else "WARNING", run_dir / "run.log" if is_main else None)
    if accelerator.num_processes > 1:
        import os

        import torch

        # Processes share the machine's cores; oversubscribed threads slow CPU runs many times over.
        if accelerator.device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // accelerator.num_processes))
        logger.info("training on %d processes (%s)", accelerator.num_processes, accelerator.distributed_type)
    context = prepare_run(config, run_dir, device=accelerator.device)
    try:
        adapter = train_stage(context, resume=args.resume, accelerator=accelerator if accelerator.num_processes > 1 else None)
    except TrainingInterrupted as interrupted:
        logger.warning("%s", interrupted)
        return 130
    if is_main:
        for name, value in control_losses(context, adapter).items():
            logger.info("validation caption loss, %s: %.4f nats/token", name, value)
        print(f"checkpoints: {run_dir / 'checkpoints'}")
    return 0


def _command_evaluate(args: argparse.Namespace) -> int:
    from mmalign.batch_eval import expand_checkpoints
    from mmalign.commands import load_run_config, run_evaluate

    config = load_run_config(args.config, args.output)
    checkpoints = expand_checkpoints([str(p) for p in args.checkpoints], args.glob)
    _configure_logging(args.log_level, Path(config.output_dir) / config.name / "run.log")
    results = run_evaluate(config, checkpoints, args.executor, args.workers, args.ray_address)
    print(f"results: {results}")
    return 0


def _command_compare(args: argparse.Namespace) -> int:
    from mmalign.commands import run_compare

    output = args.output or (args.run_b / f"compare-{args.run_a.name}")
    _configure_logging(args.log_level, output / "compare.log")
    comparison = run_compare(args.run_a, args.run_b, output)
    headline = comparison[comparison["metric"].isin(["sae_fvu", "cka_linear", "retrieval_i2t_r1"])]
    print(headline.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"comparison: {output / 'comparison.parquet'}")
    return 0


def _command_treat(args: argparse.Namespace) -> int:
    from mmalign.commands import load_run_config, run_treatment

    config = load_run_config(args.config, args.output)
    _configure_logging(args.log_level, Path(config.output_dir) / config.name / "run.log")
    results, treated, output_dir = run_treatment(config, args.treatment, args.from_checkpoint)
    for item in treated:
        logger.info("%s: %s", item.name, ", ".join(f"{key} {value:.4g}" for key, value in item.metrics.items() if isinstance(value, (int, float))))
    print(f"treated checkpoints: {', '.join(str(item.directory) for item in treated)}")
    print(f"results: {output_dir / 'results.parquet'}")
    return 0


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmalign", description="Measure where vision-encoder tokens become language-like inside a frozen LM.")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="Logging level (default INFO).")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="Train an adapter, fit SAE probes, evaluate every layer and write the report.")
    run.add_argument("config", type=Path, help="YAML run config, e.g. configs/demo.yaml.")
    run.add_argument("--output", type=Path, default=None, help="Directory under which the run directory is made (default: the config's output_dir, 'runs').")
    run.set_defaults(handler=_command_run)
    train = commands.add_parser("train", help="Train the adapter only; under `accelerate launch` it runs data-parallel.")
    train.add_argument("config", type=Path, help="YAML run config.")
    train.add_argument("--output", type=Path, default=None, help="Directory under which the run directory is made.")
    train.add_argument("--resume", action="store_true", help="Continue from the newest step checkpoint of the run.")
    train.set_defaults(handler=_command_train)

    evaluate = commands.add_parser("evaluate", help="Evaluate adapter checkpoints with the run's probes; finished checkpoints are skipped.")
    evaluate.add_argument("checkpoints", nargs="*", type=Path, help="Checkpoint directories.")
    evaluate.add_argument("--glob", default=None, help="Glob of checkpoint directories, e.g. 'runs/demo/checkpoints/step_*' (quote it).")
    evaluate.add_argument("--config", type=Path, required=True, help="The run config (models, data, probes, evaluation settings).")
    evaluate.add_argument("--output", type=Path, default=None, help="Directory under which the run directory is made.")
    evaluate.add_argument("--executor", choices=["local", "ray"], default="local", help="Evaluate in this process, or on Ray actors that each load the models once.")
    evaluate.add_argument("--workers", type=int, default=2, help="Ray actors (with --executor ray).")
    evaluate.add_argument("--ray-address", default=None, help="A running Ray cluster, e.g. ray://HEAD:10001 (default: a local instance on 127.0.0.1).")
    evaluate.set_defaults(handler=_command_evaluate)

    compare = commands.add_parser("compare", help="Per-layer differences of two runs' final adapters, with paired bootstrap intervals.")
    compare.add_argument("run_a", type=Path, help="Run directory A (its probes and validation images are used).")
    compare.add_argument("run_b", type=Path, help="Run directory B; differences are B minus A.")
    compare.add_argument("--output", type=Path, default=None, help="Output directory (default: RUN_B/compare-NAME_A).")
    compare.set_defaults(handler=_command_compare)

    treat = commands.add_parser("treat", help="Apply a treatment to a checkpoint and measure its effect on alignment.")
    treat.add_argument("--treatment", required=True, help="Treatment name: self-rewarding, self-correcting, self-adapting, bytelevel, loss-discovery, or one a plugin registers.")
    treat.add_argument("--from", dest="from_checkpoint", type=Path, required=True, help="The checkpoint to treat (the baseline).")
    treat.add_argument("--config", type=Path, required=True, help="Run config with a `treatment:` mapping of the treatment's settings.")
    treat.add_argument("--output", type=Path, default=None, help="Directory under which the run directory is made.")
    treat.set_defaults(handler=_command_treat)

    from mmalign.bytes_cli import register_cli as register_bytes
    from mmalign.reports.cli import register_cli as register_report
    from mmalign.sync import register_cli as register_sync

    register_report(commands)

    register_sync(commands)
    register_bytes(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ConfigError, FileNotFoundError, ValueError) as error:
        if logger.handlers:  # also goes to the run's log file
            logger.error("%s", error)
        else:
            print(f"mmalign: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mmalign: interrupted; finished stages are kept and a rerun continues from them", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
