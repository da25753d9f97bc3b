"""Shared CLI plumbing: error translation, progress bars, JSON output, reusable options."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys

import click

from ..errors import EdgetlError

log = logging.getLogger("edgetl")


def quiet_tensorflow() -> None:
    """Keep TensorFlow's own chatter (C++ and its Python logger) off the user's terminal."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)


def handle_errors(fn):
    """Library errors become one clean ``Error: ...`` line and exit code 1 at the CLI edge."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EdgetlError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:  # a full disk, a read-only folder, a permission: say which file and why
            where = f"{exc.filename}: " if exc.filename else ""
            raise click.ClickException(
                f"{where}{exc.strerror or exc} (nothing was left half-written: edgetl writes a temporary "
                "file and renames it only when complete)"
            ) from None

    return wrapper


def json_option(fn):
    return click.option("--json", "as_json", is_flag=True, help="Print one machine-readable JSON document on stdout.")(fn)


def threads_option(fn):
    return click.option("--threads", type=click.IntRange(min=1), default=None,
                        help="CPU threads for the runtime (default: all cores).")(fn)


def emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=_json_default))


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


class _StderrHandler(logging.Handler):
    def emit(self, record):
        click.echo(f"{record.levelname.lower()}: {record.getMessage()}", err=True)


def setup_logging(verbose: bool = False) -> None:
    if any(isinstance(h, _StderrHandler) for h in log.handlers):
        log.setLevel(logging.INFO if verbose else logging.WARNING)
        return
    log.addHandler(_StderrHandler())
    log.setLevel(logging.INFO if verbose else logging.WARNING)
    log.propagate = False


class ProgressBars:
    """A ``progress(stage, done, total)`` callback drawing one rich bar per stage on stderr.

    Without a terminal (CI logs, pipes, tests) it draws nothing.
    """

    def __init__(self, enabled: bool | None = None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._progress = None
        self._tasks: dict[str, int] = {}

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=Console(stderr=True), transient=False,
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)
        return False

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self._progress is None:
            return
        if stage not in self._tasks:
            self._tasks[stage] = self._progress.add_task(stage, total=total)
        self._progress.update(self._tasks[stage], completed=done, total=total)


def print_table(title: str, columns: list[str], rows: list[list]) -> None:
    """A rich table on stdout."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c, justify="left" if c in (columns[0], "status", "label", "file") else "right", no_wrap=True)
    for r in rows:
        table.add_row(*["" if v is None else str(v) for v in r])
    Console(width=max(160, Console().width), soft_wrap=True).print(table)
