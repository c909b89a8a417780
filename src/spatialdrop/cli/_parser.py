"""The argument parser of the ``spatialdrop`` command, and the dispatch to its commands.

Every command checks its options and its ``--out`` before it computes anything (:mod:`._io`),
and before it imports torch: this module and the ones it imports at the top do not, so that a
mistyped option fails at once. The help texts state the defaults that the code uses (they are
built from the same constants).
"""

from __future__ import annotations

import argparse
import difflib
import os
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from ._io import check_file, check_folder, output_format
from ._options import BENCH_FORMATS, DEFAULT_REPEATS, DEMO_FILES, IMAGE_FORMATS, MAX_SIZE, SUITES

__all__ = ["LOAD_LIBRARY", "MAX_SEED", "PROG", "build_parser", "load_library", "unrecognized"]

PROG = "spatialdrop"
# set by the ``spatialdrop`` script (:mod:`spatialdrop_cli`), which defers ``import spatialdrop``
# (and torch) until the command line has been checked
LOAD_LIBRARY: Callable[[], None] | None = None


def load_library() -> None:
    """Finish the import of the library if the script deferred it; call before importing torch."""
    if LOAD_LIBRARY is not None:
        LOAD_LIBRARY()


# torch's generators take seeds up to 2**64 - 1; the demo adds 1000 per run to the base seed
MAX_SEED = 2**63 - 1


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


def _int_in(minimum: int, maximum: int, why: str = "") -> Callable[[str], int]:
    def parse(text: str) -> int:
        allowed = f"an int in [{minimum}, {maximum}]{why}"
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}") from None
        if not minimum <= value <= maximum:
            shown = text if len(text) <= 30 else text[:27] + "..."
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {shown!r}")
        return value

    parse.__name__ = f"int in [{minimum}, {maximum}]"
    return parse


def _path(text: str) -> Path:
    # Path("") is ".": an empty --out would quietly mean the current folder
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must be a file or folder name, got {text!r}")
    return Path(text)


_path.__name__ = "path"


def _seed(text: str) -> int:
    allowed = f"an int in [0, 2**63 - 1 = {MAX_SEED}]"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        shown = text if len(text) <= 30 else text[:27] + "..."
        raise argparse.ArgumentTypeError(f"must be {allowed}, got {shown!r}")
    return value


_seed.__name__ = "seed"


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


class _Formatter(argparse.HelpFormatter):
    """Wraps each paragraph of a description to the terminal's width, and adds the defaults."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = text.split("\n\n")
        return "\n\n".join(
            textwrap.fill(" ".join(p.split()), width, initial_indent=indent, subsequent_indent=indent)
            for p in paragraphs
        )

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
    """Paragraphs of a description; :class:`_Formatter` wraps them to the terminal's width."""
    return "\n\n".join(" ".join(p.split()) for p in paragraphs)


def unrecognized(parser: argparse.ArgumentParser, extras: Sequence[str]) -> NoReturn:
    """Exit 2 naming the ``extras`` that ``parser`` does not know, with a hint for each option.

    Options are never abbreviated (``allow_abbrev=False``): ``--bl`` is not ``--block-size``. The
    hint names the options that ``--bl`` would have abbreviated, or the closest spellings.
    """
    known = sorted({o for a in parser._actions for o in a.option_strings if o.startswith("--")})
    hints = []
    for extra in extras:
        name = extra.split("=", 1)[0]
        if not name.startswith("-") or name in ("-", "--"):
            continue
        longer = [o for o in known if o.startswith(name) and o != name] if name.startswith("--") else []
        bare = {o.lstrip("-"): o for o in known}
        similar = difflib.get_close_matches(name.lstrip("-"), list(bare), n=2, cutoff=0.7)
        close = longer or [bare[o] for o in similar]
        if close:
            hints.append(f"{name}: did you mean {' or '.join(close)}?")
    text = f"unrecognized arguments: {' '.join(extras)}"
    if hints:
        text += " (options are not abbreviated; " + "; ".join(hints) + ")"
    parser.error(text)


def _per_data(field: str) -> str:
    """The demo's default of ``field`` per data set and with --quick, from its own settings.

    E.g. ``"default: 150 for digits, 50 for volumes; with --quick 25 and 10"``.
    """
    from .demo_settings import make_settings

    def text(quick: bool) -> str:
        digits, volumes = (getattr(make_settings(d, quick), field) for d in ("digits", "volumes"))
        if digits == volumes:
            return f"{digits}"
        return f"{digits} for digits, {volumes} for volumes" if not quick else f"{digits} and {volumes}"

    full, quick = text(False), text(True)
    return f"default: {full}" if full == quick else f"default: {full}; with --quick {quick}"


class _Version(argparse.Action):
    """``--version``: imports the library (and torch) only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=str(kwargs["help"]))

    def __call__(self, parser: argparse.ArgumentParser, *args: object, **kwargs: object) -> NoReturn:
        load_library()
        from spatialdrop import __version__

        print(f"{PROG} {__version__}")
        parser.exit()


RULES = _describe(
    "Every command checks its options and --out before any work: a bad one exits with code 2 and "
    "one line. --out is never a folder name (demo: a folder, holding no folder named like its "
    "files), nor a device or pipe (/dev/stdout: leave out --out); a symbolic link is written "
    "through to its target; an existing file is replaced only with --force, whole, after the new "
    "one has been written. A suffix of --out that names a format chooses it; --format chooses for "
    "a name without one (or with a suffix that names none), and a --format that the suffix "
    "contradicts is refused.",
    "Exit codes: 0 done; 1 a missing optional dependency, or a failure during the run (one line; "
    "SPATIALDROP_TRACEBACK=1 shows the traceback); 2 a bad option or --out; 130 Ctrl-C; 143 "
    "SIGTERM (stopped as by Ctrl-C).",
)


def _force(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--force", action="store_true", help=f"overwrite {what} (without it, an existing one is refused)"
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``spatialdrop`` command and its subcommands."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        allow_abbrev=False,
        formatter_class=_Formatter,
        description="Structured dropout for PyTorch: see it work (demo), time it (bench), look at it (show).",
        epilog=_describe(
            'The commands need the optional dependencies: pip install "spatialdrop[demo]"', RULES
        ),
    )
    parser.add_argument("--version", action=_Version, help="show the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="{demo,bench,show}")

    demo = sub.add_parser(
        "demo",
        allow_abbrev=False,
        epilog=RULES,
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
            "Given --seed and --threads, a run repeats its numbers exactly on the same machine with "
            "the same torch build; another CPU or torch build may change the last digits. The "
            "default run trains 20 models (digits) and takes minutes (times: docs/performance.md).",
        ),
    )
    demo.add_argument("--data", choices=("digits", "volumes"), default="digits", help="the data set")
    demo.add_argument(
        "--out", type=_path, default=Path("spatialdrop-demo"), help="output folder (created if missing)"
    )
    _force(demo, "results.json and figure.png in --out")
    demo.add_argument("--quick", action="store_true", help="fewer seeds and epochs: a smoke run")
    demo.add_argument("--seed", type=_seed, default=0, help="base seed (data split and runs)")
    demo.add_argument(
        "--seeds", type=_int_at_least(1), default=None, help=f"runs per regulariser ({_per_data('seeds')})"
    )
    demo.add_argument(
        "--epochs", type=_int_at_least(1), default=None, help=f"epochs per run ({_per_data('epochs')})"
    )
    demo.add_argument(
        "-p",
        "--p",
        type=_probability,
        default=None,
        help=f"drop probability of every layer ({_per_data('p')})",
    )
    demo.add_argument(
        "--block-size",
        type=_int_at_least(1),
        default=None,
        help=f"DropBlock block size ({_per_data('block_size')})",
    )
    demo.add_argument(
        "--mc-samples",
        type=_int_at_least(1),
        default=None,
        help=f"MC-dropout samples ({_per_data('mc_samples')})",
    )
    demo.add_argument(
        "--jobs", type=_int_at_least(1), default=_default_jobs(), help="training processes run in parallel"
    )
    demo.add_argument("--threads", type=_int_at_least(1), default=1, help="torch threads per process")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(func=_demo, command_parser=demo)

    bench = sub.add_parser(
        "bench",
        allow_abbrev=False,
        epilog=RULES,
        help="time our layers against torch, torchvision and timm",
        formatter_class=_Formatter,
        description=_describe(
            "Side-by-side CPU benchmark: forward and forward+backward time (median of repeats, "
            "after warm-up) as ratios to a bare x * 2.0 measured in the same run, our layers under "
            "torch.compile(fullgraph=True) as a ratio to eager, bytes saved for backward, and the "
            "realised drop rate (mean, corner, centre) of ours and, when installed, torch's, "
            "torchvision's and timm's layers. Rows of peers that are not installed (or fail to "
            "import) are listed with a note. The bench measures and does not judge: the speed and "
            "memory goals are checked on a JSON report (--out NAME.json) by python "
            "benchmarks/goals.py NAME.json in a source checkout. The table fits in 100 columns; "
            "--format markdown, json or csv hold every column.",
            "One thread by default: on a machine shared with other work, every parallel region of "
            "a multi-threaded run can wait for a scheduler tick, which punishes code made of many "
            "small ops far more than the work itself. Use --threads N on an idle machine. "
            "Ctrl-C writes the rows measured so far, marked partial, to NAME.partial.SUFFIX beside "
            "--out NAME.SUFFIX, or NAME.partial-2.SUFFIX (-3, ...) when that is taken (neither a "
            "complete --out nor an older partial file is ever replaced; stdout without --out) and "
            "exits with 130; SIGTERM does the same and exits with 143.",
        ),
    )
    bench.add_argument(
        "--suite",
        choices=(*SUITES, "all"),
        default="all",
        help="spatial: channel dropout vs torch; dropblock: DropBlock speed and calibration vs "
        "torchvision, timm, dropblock; family: DropPath, Gaussian, alpha, filter dropout, and "
        "DropPath residual (the branch on the kept samples only, vs x + DropPath(branch(x)), at "
        "p 0.1 and 0.3 whatever -p says); keyed: keyed vs unkeyed masks",
    )
    bench.add_argument(
        "--format",
        choices=tuple(dict.fromkeys(BENCH_FORMATS.values())),
        default=None,
        help="output format (default: the one the suffix of --out names: .txt table, .md or "
        ".markdown markdown, .json, .csv; table without a suffix)",
    )
    bench.add_argument("--out", type=_path, default=None, help="write to this file instead of stdout")
    _force(bench, "--out")
    bench.add_argument("--quick", action="store_true", help="small shapes and few repeats: a smoke run")
    bench.add_argument(
        "--repeats",
        type=_int_at_least(1),
        default=None,
        help=f"timed repeats per row (default: {DEFAULT_REPEATS[False]}; "
        f"{DEFAULT_REPEATS[True]} with --quick)",
    )
    bench.add_argument(
        "--threads", type=_int_at_least(1), default=1, help="torch intra-op threads during the run"
    )
    bench.add_argument("-p", "--p", type=_probability, default=0.1, help="drop probability")
    bench.add_argument("--seed", type=_seed, default=0, help="random seed")
    bench.add_argument(
        "--no-compile",
        action="store_true",
        help="skip the torch.compile(fullgraph=True) rows (compiling takes a while on a small machine)",
    )
    bench.add_argument(
        "--tuned-malloc",
        action="store_true",
        help="turn glibc's mmap threshold off during the run, so that freed memory is reused instead "
        "of page-faulted in again on every call (as jemalloc/tcmalloc do); without it the bench "
        "uses the allocator as users get it. The choice is reported with the results",
    )
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.set_defaults(func=_bench, command_parser=bench)

    show = sub.add_parser(
        "show",
        allow_abbrev=False,
        epilog=RULES,
        help="draw sample masks and per-position drop rates to an image",
        formatter_class=_Formatter,
        description=_describe(
            "Draw one sample mask of each layer on a --size map (dropped = dark), the per-position "
            "drop rate over many draws of our DropBlock and of torchvision's and timm's when "
            "installed (the calibration picture), and a 3-D DropBlock mask as slices. The image is "
            "written to exactly the --out path (a symbolic link: to its target), in the format its "
            "suffix names: .png, .pdf, .svg, .jpg or .jpeg (PNG without a suffix; --format for another "
            "suffix; a suffix naming another format than --format is refused)."
        ),
    )
    show.add_argument(
        "--out",
        type=_path,
        default=Path("spatialdrop-masks.png"),
        help="the image to write (.png, .pdf, .svg, .jpg)",
    )
    show.add_argument(
        "--format",
        choices=tuple(dict.fromkeys(IMAGE_FORMATS.values())),
        default=None,
        help="image format (default: the one the suffix of --out names; png without a suffix)",
    )
    _force(show, "--out")
    show.add_argument(
        "--size",
        type=_int_in(1, MAX_SIZE, " (a larger map has more elements than the image has pixels)"),
        default=28,
        help=f"side of the square map, at most {MAX_SIZE}",
    )
    show.add_argument("--block-size", type=_int_at_least(1), default=7, help="DropBlock block size")
    show.add_argument("-p", "--p", type=_probability, default=0.1, help="drop probability")
    show.add_argument(
        "--draws", type=_int_at_least(1), default=20000, help="maps drawn per drop-rate heat map"
    )
    show.add_argument(
        "--panels",
        choices=("all", "masks", "rates"),
        default="all",
        help="masks: sample masks and 3-D slices; rates: the per-position drop-rate heat maps",
    )
    show.add_argument("--seed", type=_seed, default=0, help="random seed")
    show.add_argument("--no-progress", action="store_true", help="no progress bar")
    show.set_defaults(func=_show, command_parser=show)
    return parser


def _demo(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .demo_settings import make_settings

    check_folder(args.out, DEMO_FILES, force=args.force, what=f"{PROG} demo --out")
    settings = make_settings(
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
    load_library()
    from .demo import run_demo  # torch: after every check

    command = " ".join([PROG, *argv])
    return run_demo(settings, args.out, show_progress=not args.no_progress, command=command)


def _bench(args: argparse.Namespace, argv: Sequence[str]) -> int:
    what = f"{PROG} bench --out"
    out = None if args.out is None else check_file(args.out, force=args.force, what=what)
    fmt = output_format(args.out, args.format, BENCH_FORMATS, "table", what)
    load_library()
    from .bench import run_bench  # torch: after every check

    return run_bench(
        suite=args.suite,
        fmt=fmt,
        out=out,
        quick=args.quick,
        repeats=args.repeats,
        threads=args.threads,
        p=args.p,
        seed=args.seed,
        show_progress=not args.no_progress,
        command=" ".join([PROG, *argv]),
        tuned_malloc=args.tuned_malloc,
        compile_ours=not args.no_compile,
    )


def _show(args: argparse.Namespace, argv: Sequence[str]) -> int:
    what = f"{PROG} show --out"
    out = check_file(args.out, force=args.force, what=what)
    fmt = output_format(args.out, args.format, IMAGE_FORMATS, "png", what)
    load_library()
    from .show import check_settings, run_show  # torch: after the checks of the options and --out

    check_settings(args.size, args.block_size, args.p)  # what DropBlock refuses, still before any work
    return run_show(
        out=out,
        size=args.size,
        block_size=args.block_size,
        p=args.p,
        draws=args.draws,
        panels=args.panels,
        seed=args.seed,
        show_progress=not args.no_progress,
        fmt=fmt,
    )
