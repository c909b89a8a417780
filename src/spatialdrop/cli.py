"""The ``spatialdrop`` command: ``demo``, ``bench`` and ``show``.

``main(argv=None) -> int`` is the entry point of the ``spatialdrop`` script and of
``python -m spatialdrop``; tests call it with a list of arguments. The commands need the optional
dependencies of the ``demo`` extra (``pip install "spatialdrop[demo]"``), imported only when a
command runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__
from ._optional import MissingDependency

__all__ = ["build_parser", "main"]

PROG = "spatialdrop"


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an int >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an int >= {minimum}, got {text!r}")
        return value

    parse.__name__ = f"int >= {minimum}"
    return parse


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a probability in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a probability in [0, 1), got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not value > 0.0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _default_jobs() -> int:
    return max(1, min(2, os.cpu_count() or 1))


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the paragraphs of a description (wrapped by :func:`_describe`) and adds defaults."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "%(default)" in text
            or action.default is None
            or action.default is False
            or action.default == argparse.SUPPRESS
        ):
            return text
        return text + " (default: %(default)s)"


def _describe(*paragraphs: str) -> str:
    return "\n\n".join(textwrap.fill(" ".join(p.split()), width=88) for p in paragraphs)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``spatialdrop`` command and its subcommands."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Structured dropout for PyTorch: see it work (demo), time it (bench), look at it (show).",
        epilog='The commands need the optional dependencies: pip install "spatialdrop[demo]"',
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,bench,show}")

    demo = sub.add_parser(
        "demo",
        help="train a small CNN with each regulariser and compare them",
        formatter_class=_Formatter,
        description=_describe(
            "Train a small CNN once per regulariser (none, nn.Dropout, SpatialDropout, DropBlock "
            "with a DropSchedule ramp) and seed on a small training set, and compare test accuracy, "
            "NLL, calibration (ECE), accuracy under corruption (occluded patch, Gaussian noise) and "
            "how well MC-dropout entropy flags wrong predictions (AUROC). Writes a table to the "
            "terminal, and results.json and figure.png to --out.",
            "--data digits: scikit-learn's handwritten digits (real data shipped with scikit-learn, "
            "no download), upsampled to 16x16. --data volumes: synthetic 12^3 volumes of five solids "
            "(sphere, cube, cylinder, torus, cone) with random pose, for the 3-D layers.",
            "Deterministic given --seed (and --threads). Defaults take about 3 minutes on 2 cores.",
        ),
    )
    demo.add_argument("--data", choices=("digits", "volumes"), default="digits", help="the data set")
    demo.add_argument("--out", type=Path, default=Path("spatialdrop-demo"), help="output folder")
    demo.add_argument("--quick", action="store_true", help="fewer seeds and epochs (under a minute)")
    demo.add_argument("--seed", type=_int_at_least(0), default=0, help="base seed (data split and runs)")
    demo.add_argument(
        "--seeds",
        type=_int_at_least(1),
        default=None,
        help="runs per regulariser (default: 5; 3 for volumes; 2 with --quick)",
    )
    demo.add_argument(
        "--epochs",
        type=_int_at_least(1),
        default=None,
        help="epochs per run (default: 150; 60 for volumes; fewer with --quick)",
    )
    demo.add_argument(
        "-p", type=_probability, default=None, help="drop probability of every layer (default: 0.1)"
    )
    demo.add_argument(
        "--block-size", type=_int_at_least(1), default=None, help="DropBlock block size (default: 3)"
    )
    demo.add_argument(
        "--mc-samples",
        type=_int_at_least(1),
        default=None,
        help="MC-dropout samples (default: 30; 10 with --quick)",
    )
    demo.add_argument(
        "--jobs", type=_int_at_least(1), default=_default_jobs(), help="training processes run in parallel"
    )
    demo.add_argument("--threads", type=_int_at_least(1), default=1, help="torch threads per process")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(func=_demo)

    bench = sub.add_parser(
        "bench",
        help="time our layers against torch, torchvision and timm",
        formatter_class=_Formatter,
        description=_describe(
            "Side-by-side CPU benchmark: forward and forward+backward time (median of repeats, "
            "after warm-up) as ratios to a bare x * 2.0 measured in the same run, bytes saved for "
            "backward, and the realised drop rate (mean, corner, centre) of ours and, when "
            "installed, torch's, torchvision's and timm's layers. Rows of peers that are not "
            "installed are listed with a note; the goals of the issues are checked at the end.",
            "One thread by default: on a machine shared with other work, every parallel region of "
            "a multi-threaded run can wait for a scheduler tick, which punishes code made of many "
            "small ops far more than the work itself. Use --threads N on an idle machine.",
        ),
    )
    bench.add_argument(
        "--suite",
        choices=("spatial", "dropblock", "family", "keyed", "all"),
        default="all",
        help="spatial: channel dropout vs torch; dropblock: DropBlock speed and calibration vs "
        "torchvision, timm, dropblock; family: DropPath, Gaussian, alpha, filter dropout; keyed: "
        "keyed vs unkeyed masks",
    )
    bench.add_argument(
        "--format", choices=("table", "markdown", "json", "csv"), default="table", help="output format"
    )
    bench.add_argument("--out", type=Path, default=None, help="write to this file instead of stdout")
    bench.add_argument("--quick", action="store_true", help="small shapes and few repeats (under a minute)")
    bench.add_argument("--repeats", type=_int_at_least(1), default=None, help="timed repeats per row")
    bench.add_argument(
        "--threads", type=_int_at_least(1), default=1, help="torch intra-op threads during the run"
    )
    bench.add_argument("-p", type=_probability, default=0.1, help="drop probability")
    bench.add_argument("--seed", type=_int_at_least(0), default=0, help="random seed")
    bench.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's default of a fresh mmap per big tensor (page faults on every call); by "
        "default the bench turns mmap off so that freed memory is reused",
    )
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.set_defaults(func=_bench)

    show = sub.add_parser(
        "show",
        help="draw sample masks and per-position drop rates to a PNG",
        formatter_class=_Formatter,
        description=_describe(
            "Draw one sample mask of each layer on a --size map (dropped = dark), the per-position "
            "drop rate over many draws of our DropBlock and of torchvision's and timm's when "
            "installed (the calibration picture), and a 3-D DropBlock mask as slices."
        ),
    )
    show.add_argument("--out", type=Path, default=Path("spatialdrop-masks.png"), help="the PNG to write")
    show.add_argument("--size", type=_int_at_least(1), default=28, help="side of the square map")
    show.add_argument("--block-size", type=_int_at_least(1), default=7, help="DropBlock block size")
    show.add_argument("-p", type=_probability, default=0.1, help="drop probability")
    show.add_argument(
        "--draws", type=_int_at_least(1), default=20000, help="masks averaged per heat map (maps x draws)"
    )
    show.add_argument(
        "--panels",
        choices=("all", "masks", "rates"),
        default="all",
        help="masks: sample masks and 3-D slices; rates: the per-position drop-rate heat maps",
    )
    show.add_argument("--seed", type=_int_at_least(0), default=0, help="random seed")
    show.set_defaults(func=_show)
    return parser


def _demo(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from . import _demo

    settings = _demo.make_settings(
        args.data,
        args.quick,
        seed=args.seed,
        seeds=args.seeds,
        epochs=args.epochs,
        p=args.p,
        block_size=args.block_size,
        mc_samples=args.mc_samples,
        jobs=args.jobs,
        threads=args.threads,
    )
    command = " ".join([PROG, *argv])
    return _demo.run_demo(settings, args.out, show_progress=not args.no_progress, command=command)


def _bench(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from . import _bench

    return _bench.run_bench(
        suite=args.suite,
        fmt=args.format,
        out=args.out,
        quick=args.quick,
        repeats=args.repeats,
        threads=args.threads,
        p=args.p,
        seed=args.seed,
        show_progress=not args.no_progress,
        command=" ".join([PROG, *argv]),
        steady=not args.default_malloc,
    )


def _show(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from . import _show

    return _show.run_show(
        out=args.out,
        size=args.size,
        block_size=args.block_size,
        p=args.p,
        draws=args.draws,
        panels=args.panels,
        seed=args.seed,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``spatialdrop`` command line with ``argv`` (default: ``sys.argv[1:]``).

    Returns:
        The exit code: 0 on success, 1 when an optional dependency is missing. Bad options exit
        through argparse with code 2 and a message naming the option.
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(args_list)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        code: int = args.func(args, args_list)
    except MissingDependency as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
