"""The `bytes` command: score or sample text with a byte-level LM, an ensemble or proxy-tuning.

    mmalign bytes score TEXT... --model SPEC [--model SPEC ...] [--mode mixture|product|proxy]
    mmalign bytes sample PROMPT --model SPEC [--model SPEC ...] [--max-bytes N] [--temperature T]

Models are LM specs (`bundled:smollm2-135m`, `bundled:gemma3-270m`, `hf:PATH`, `gguf:PATH`).
Several models are combined at bytes, so their tokenizers may differ. The command reads text
only; an image-conditioned byte model needs a run and the `bytelevel` treatment.
"""

from __future__ import annotations

import argparse
import math
import sys


def _byte_model_config(args: argparse.Namespace):
    from pydantic import ValidationError

    from mmalign.loops.bytelevel_ensemble import RUN_LM, ByteModelConfig

    if RUN_LM in args.model:
        raise ValueError(f"--model {RUN_LM} needs a run's adapter and image; the bytes command reads text only, so give LM specs")
    try:
        return ByteModelConfig(members=args.model, mode=args.mode, weights=args.weights, alpha=args.alpha)
    except ValidationError as error:
        problems = "; ".join(item["msg"].removeprefix("Value error, ") for item in error.errors())
        raise ValueError(f"invalid byte model: {problems}") from None


def _build(args: argparse.Namespace, prompt: bytes):
    from mmalign.loops.bytelevel_treatment import ByteModelBuilder

    return ByteModelBuilder(_byte_model_config(args), text_prompt=prompt).build()


def _command_score(args: argparse.Namespace) -> int:
    from mmalign.loops.bytelevel_treatment import bits_per_byte

    prompt = args.prompt.encode("utf-8")
    model = _build(args, prompt)
    for text in args.texts:
        if not text:
            raise ValueError("cannot score an empty text; bits per byte divide by the text's length")
        bits = bits_per_byte(model, text.encode("utf-8"), prompt, add_eot=args.eot)
        print(f"{bits:.4f}\t{text}")
        if not math.isfinite(bits):
            print(f"mmalign: {text!r} has probability zero under this model", file=sys.stderr)
    return 0


def _command_sample(args: argparse.Namespace) -> int:
    from mmalign.loops.bytelevel_treatment import decode_sampled

    prompt = args.prompt.encode("utf-8")
    model = _build(args, prompt)
    stop = args.stop.encode("utf-8").decode("unicode_escape").encode("latin-1")
    data = model.sample(prompt, args.max_bytes, args.temperature, args.top_p, args.seed, stop)
    text, invalid = decode_sampled(data)
    if invalid:
        print("mmalign: the sample is not valid UTF-8; invalid bytes are shown as U+FFFD", file=sys.stderr)
    print(text)
    return 0


def _add_model_arguments(parser: argparse.ArgumentParser, with_prompt: bool) -> None:
    parser.add_argument("--model", action="append", required=True, metavar="SPEC",
                        help="LM spec, repeatable: bundled:smollm2-135m, bundled:gemma3-270m, hf:PATH_OR_REPO or gguf:PATH.")
    parser.add_argument("--mode", choices=["mixture", "product", "proxy"], default="mixture",
                        help="How several models combine (default mixture); proxy takes base, expert and anti-expert in that order.")
    parser.add_argument("--weights", type=float, nargs="+", default=None, help="mixture and product: one positive weight per model (default equal).")
    parser.add_argument("--alpha", type=float, default=1.0, help="proxy: strength of the expert minus anti-expert difference (default 1).")
    if with_prompt:
        parser.add_argument("--prompt", default="", help="Text that conditions each scored text (default none).")


def _temperature(value: str) -> float:
    number = float(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"temperature {value} is negative; give 0 (greedy) or a positive number")
    return number


def _top_p(value: str) -> float:
    number = float(value)
    if not 0 < number <= 1:
        raise argparse.ArgumentTypeError(f"top-p {value} is outside (0, 1]")
    return number


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return number


def register_cli(commands: argparse._SubParsersAction) -> None:
    """Add `mmalign bytes score` and `mmalign bytes sample` to the CLI."""
    parser = commands.add_parser("bytes", help="Score or sample text with a byte-level LM, a byte-level ensemble or proxy-tuning.")
    actions = parser.add_subparsers(dest="bytes_command", required=True)

    score = actions.add_parser("score", help="Print each text's bits per byte, one line per text: bits, a tab, the text.")
    score.add_argument("texts", nargs="+", metavar="TEXT", help="Texts to score.")
    _add_model_arguments(score, with_prompt=True)
    score.add_argument("--eot", action="store_true", help="Also score the end of text after each text (default: the text as a prefix).")
    score.set_defaults(handler=_command_score)

    sample = actions.add_parser("sample", help="Print a continuation of PROMPT sampled byte by byte.")
    sample.add_argument("prompt", metavar="PROMPT", help="Text to continue; it may end inside a word.")
    _add_model_arguments(sample, with_prompt=False)
    sample.add_argument("--max-bytes", type=_positive_int, default=100, help="Maximum bytes to generate (default 100).")
    sample.add_argument("--temperature", type=_temperature, default=1.0, help="Softmax temperature; 0 takes the most probable byte (default 1).")
    sample.add_argument("--top-p", type=_top_p, default=1.0, help="Nucleus mass in (0, 1] (default 1, no truncation).")
    sample.add_argument("--seed", type=int, default=0, help="Sampling seed (default 0).")
    sample.add_argument("--stop", default="", help=r"Bytes that end the sample besides end of text, with escapes, e.g. '\n' (default none).")
    sample.set_defaults(handler=_command_sample)
