"""The ``spatialdrop`` command line: ``demo``, ``bench`` and ``show``.

``main(argv=None) -> int`` is the entry point of the ``spatialdrop`` script and of
``python -m spatialdrop``; tests call it with a list of arguments. The applications use the
library only through its public API (``spatialdrop``, ``spatialdrop.functional``); they need the
optional dependencies of the ``demo`` extra (``pip install "spatialdrop[demo]"``), imported only
when a command runs.

Exit codes: 0 done; 1 an optional dependency is missing, or the run failed (one line, no
traceback; ``SPATIALDROP_TRACEBACK=1`` shows it); 2 a bad option or output path (checked before
any work, and before torch is imported); 130 interrupted with Ctrl-C; 143 ended by SIGTERM (the
same clean-up as Ctrl-C).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from ._io import OutputError, SettingsError
from ._optional import MissingDependency, one_line
from ._parser import PROG, build_parser, unrecognized
from ._signals import exit_code, sigterm_as_interrupt, stopped

COMMANDS = ("demo", "bench", "show")

__all__ = ["build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``spatialdrop`` command line with ``argv`` (default: ``sys.argv[1:]``).

    Returns:
        The exit code: 0 on success, 1 when an optional dependency is missing or the run failed
        (one line on stderr), 2 for an output path that cannot be written or settings the layers
        refuse (one line on stderr, before any work), 130 after Ctrl-C, 143 after SIGTERM. Bad
        options exit through argparse with code 2 and a message naming the option.
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    commands = [a for a in args_list if a in COMMANDS]
    if args_list and args_list[0] not in (*COMMANDS, "-h", "--help", "--version") and commands:
        # "spatialdrop --p 0.2 show" would read as "invalid choice: '0.2'"
        at = args_list.index(commands[0])
        rest = args_list[:at] + args_list[at + 1 :]
        parser.error(f"options go after the command: {PROG} {commands[0]} {' '.join(rest)}")
    args, extras = parser.parse_known_args(args_list)
    if args.command is None:
        if extras:
            unrecognized(parser, extras)
        parser.print_help(sys.stderr)
        return 2
    if extras:  # named by the command's own parser: its usage, and a hint for a misspelt option
        unrecognized(args.command_parser, extras)
    try:
        with sigterm_as_interrupt():
            code: int = args.func(args, args_list)
    except (OutputError, SettingsError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except MissingDependency as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        print(f"{PROG} {args.command}: {stopped(err)}", file=sys.stderr)
        return exit_code(err)
    except Exception as err:  # after the work started: one line, not a traceback
        if os.environ.get("SPATIALDROP_TRACEBACK") == "1":
            raise
        print(f"{PROG} {args.command}: failed: {one_line(err, 300)}", file=sys.stderr)
        return 1
    return code
