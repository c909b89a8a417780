"""``spatialdrop bench``: time our layers side by side with torch's, torchvision's and timm's.

For every case (an input shape and the implementations compared on it, see
:mod:`.bench_cases`) the bench reports, as medians over interleaved repeats after a warm-up
(see :mod:`.bench_measure`):

- forward time, and forward + backward time (``torch.autograd.grad`` with a ones gradient), each
  also as a ratio to a bare ``x * 2.0`` measured on the same input in the same run, and the
  forward + backward speed-up over torchvision where torchvision has the op;
- for our layers under ``torch.compile(fullgraph=True)``: their time over the eager layer's;
- in the DropPath residual cases (the branch run on the kept samples only): the baseline
  ``x + DropPath(p)(branch(x))``'s forward + backward time over each row's (``vs_baseline``),
  the gradients of the branch's weights computed too;
- the bytes that autograd saves for backward, counted with
  :func:`torch.autograd.graph.saved_tensors_hooks`, each storage once, the input itself not
  counted (it is alive anyway), also as a fraction of the input's bytes;
- the realised drop rate on an all-ones input: over every element, at the corners of the
  spatial map and at its centre (a calibrated layer drops ``p`` everywhere).

Calibration cases (DropBlock suite) only measure the drop rates, on many independent
single-channel maps of a few sizes, and whether float16 input gives a finite, non-zero output.
Peers that are not installed are listed with a note instead of numbers.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from ._io import write_new, write_text
from ._optional import progress
from ._options import DEFAULT_REPEATS
from ._signals import exit_code, stopped
from .bench_cases import cases_for
from .bench_measure import Row, measure, steady_malloc
from .bench_report import environment, format_rows

__all__ = ["DEFAULT_REPEATS", "TUNED_MALLOC", "partial_path", "run_bench"]

CMD = "bench"
WARMUP = {False: 3, True: 1}
TUNED_MALLOC = "glibc, mmap off and no trim (freed memory reused)"


def _emit(text: str, out: Path | None) -> None:
    text = text if text.endswith("\n") else text + "\n"
    if out is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        write_text(out, text)


def partial_path(out: Path) -> Path:
    """Where an interrupted run writes its rows: ``bench.csv`` -> ``bench.partial.csv``.

    A complete result at ``out`` is never replaced by a partial one; when this name is taken (an
    older partial result), ``bench.partial-2.csv``, ``-3``... (:func:`.write_new`).
    """
    return out.with_name(f"{out.stem}.partial{out.suffix}")


def run_bench(
    *,
    suite: str = "all",
    fmt: str = "table",
    out: Path | None = None,
    quick: bool = False,
    repeats: int | None = None,
    threads: int | None = None,
    p: float = 0.1,
    seed: int = 0,
    show_progress: bool = True,
    command: str = "",
    tuned_malloc: bool = False,
    compile_ours: bool = True,
) -> int:
    """Run the suite, print or write the rows in ``fmt``; return the exit code.

    ``out`` must have been checked by the caller (:func:`.check_file`). On Ctrl-C the rows
    measured so far are written, marked partial in every format, to :func:`partial_path` of
    ``out`` (``out`` itself is left as it was) or to stdout (nothing when there are none), and the
    exit code is 130; an older partial file is never replaced (the next free name is used). With
    ``quick`` (a smoke run on small shapes) the report says it is one. The bench does not judge
    the rows: ``benchmarks/goals.py`` checks the goals on a JSON report.
    """
    started = time.perf_counter()
    threads_before = torch.get_num_threads()
    threads = threads or 1
    repeats = repeats or DEFAULT_REPEATS[quick]
    warmup = WARMUP[quick]
    tuned = tuned_malloc and steady_malloc(True)
    env = environment(threads, TUNED_MALLOC if tuned else "default (glibc)")  # load before the run
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    rows: list[Row] = []
    cases = []
    done = 0
    interrupted: KeyboardInterrupt | None = None
    try:
        cases = cases_for(suite, quick, p, compile_ours)
        total = sum(warmup + repeats if c.timed else 1 for c in cases)
        with progress(CMD, total=total, desc=f"bench {suite}", enabled=show_progress, unit="round") as bar:
            for case in cases:
                bar.set_postfix_str(case.name)
                rows += measure(case, repeats, warmup, tick=lambda: bar.update(1))
                done += 1
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM (:mod:`._signals`)
        interrupted = err
    finally:
        torch.set_num_threads(threads_before)
        if tuned:
            steady_malloc(False)
    elapsed = time.perf_counter() - started
    if interrupted is not None:
        where = ""
        if rows:
            partial = f"interrupted after {elapsed:.0f} s, {done} of {len(cases)} cases measured"
            text = format_rows(rows, fmt, env, command, smoke=quick, partial=partial)
            # never over an older partial result: the first free name of NAME.partial[-K].SUFFIX
            target = write_new(partial_path(out), text) if out is not None else None
            if target is None:
                _emit(text, None)
            kept = f" ({out} left as it was)" if out is not None and out.exists() else ""
            where = f"; wrote the {len(rows)} rows measured so far to {target or 'stdout'}{kept}"
        print(f"spatialdrop bench: {stopped(interrupted)} after {elapsed:.0f} s{where}", file=sys.stderr)
        return exit_code(interrupted)
    _emit(format_rows(rows, fmt, env, command, smoke=quick), out)
    done_text = f"wrote {out} in {elapsed:.0f} s" if out is not None else f"bench done in {elapsed:.0f} s"
    print(done_text, file=sys.stdout if out is not None else sys.stderr)
    return 0
