"""Shared CLI plumbing: error translation, progress bars, JSON output, reusable options."""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import os
import sys
import tempfile
import warnings

import click

from ..errors import ConfigError, EdgetlError
from ..formats import parse_targets

log = logging.getLogger("edgetl")


_VERBOSE = False


def set_verbose(verbose: bool) -> None:
    global _VERBOSE
    _VERBOSE = verbose


class NativeStderr:
    """Hold back what native libraries write straight to file descriptor 2.

    TensorFlow, XLA, absl and the TFLite converter print start-up and conversion chatter from
    C++ (CUDA probing, oneDNN notices, ``fully_quantize: 0 ...``) that no Python setting
    silences. While active, descriptor 2 goes to a temporary file and Python's ``sys.stderr``
    (progress bars, warnings, errors) to the terminal as before. ``stop(replay=True)`` prints
    what was held back, so a failure still shows the native messages that led to it.
    """

    active: NativeStderr | None = None

    def __init__(self):
        self._saved_fd = None
        self._saved_stderr = None
        self._log = None

    def start(self) -> None:
        if NativeStderr.active is not None:
            return
        sys.stderr.flush()
        self._log = tempfile.TemporaryFile()
        self._saved_fd = os.dup(2)
        self._saved_stderr = sys.stderr
        sys.stderr = io.TextIOWrapper(os.fdopen(os.dup(self._saved_fd), "wb", buffering=0),
                                      encoding=getattr(self._saved_stderr, "encoding", None) or "utf-8",
                                      errors="backslashreplace", line_buffering=True, write_through=True)
        os.dup2(self._log.fileno(), 2)
        NativeStderr.active = self

    def stop(self, replay: bool = False) -> None:
        if NativeStderr.active is not self:
            return
        NativeStderr.active = None
        sys.stderr.flush()
        os.dup2(self._saved_fd, 2)
        os.close(self._saved_fd)
        held = sys.stderr
        sys.stderr = self._saved_stderr
        held.close()
        self._log.seek(0)
        text = self._log.read().decode("utf-8", "backslashreplace")
        self._log.close()
        if replay and text.strip():
            sys.stderr.write("native library messages (held back while the command ran):\n" + text)
            sys.stderr.flush()


def quiet_tensorflow() -> None:
    """Keep TensorFlow's own chatter (C++ and its Python logger) off the user's terminal.

    Unless ``edgetl -v`` was given, native stderr output is held back for the rest of the
    command and shown only if the command fails (see :class:`NativeStderr`).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    if not _VERBOSE:
        warnings.filterwarnings("ignore", module=r"(keras|tensorflow|tf2onnx|absl)(\.|$)")
        # ONNX Runtime's quantizer and tf2onnx log warnings on the root logger ("Quantized bias
        # ... exceeds the range of a int32"); edgetl's own logger does not propagate there.
        logging.getLogger().addHandler(logging.NullHandler())
        NativeStderr().start()


class Interrupted(click.ClickException):
    """Ctrl-C: one line, exit 130 (128 + SIGINT); writes are atomic, so nothing half-done is left."""

    exit_code = 130


def _quiet_broken_pipe() -> None:
    """The reader went away (``| head``): stop writing and exit quietly, as Unix tools do."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    sys.exit(141)  # 128 + SIGPIPE: what a shell reports for a tool stopped by the closed pipe


def handle_errors(fn):
    """Library errors become one clean ``Error: ...`` line and exit code 1 at the CLI edge; Ctrl-C
    is one line and 130; a reader that went away (``| head``) ends the command quietly."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        replay = True  # an unexpected failure shows the native messages that led to it
        try:
            result = fn(*args, **kwargs)
            replay = False
            return result
        except (SystemExit, click.ClickException):
            replay = False
            raise
        except KeyboardInterrupt:
            replay = False
            raise Interrupted("interrupted; nothing half-written was left behind") from None
        except BrokenPipeError:
            replay = False
            _quiet_broken_pipe()
        except EdgetlError as exc:  # says what went wrong itself; the held-back chatter would bury it
            replay = False
            raise click.ClickException(str(exc)) from None
        except OSError as exc:  # a full disk, a read-only folder, a permission: say which file and why
            replay = False
            where = f"{exc.filename}: " if exc.filename else ""
            raise click.ClickException(f"{where}{exc.strerror or exc}") from None
        finally:
            if NativeStderr.active is not None:
                NativeStderr.active.stop(replay=replay)

    return wrapper


def check_targets(ctx, param, value):
    """``-f/--format`` values checked while the command line is parsed: a wrong one is a usage error (2)."""
    if value:
        try:
            parse_targets(list(value))
        except ConfigError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


def default(config_cls, name: str):
    """A config dataclass's default for ``name``: CLI defaults are read from here, never re-typed."""
    for f in dataclasses.fields(config_cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
    raise KeyError(f"{config_cls.__name__} has no field {name!r} with a default")


def json_option(fn):
    return click.option("--json", "as_json", is_flag=True, help="Print one machine-readable JSON document on stdout.")(fn)


def threads_option(fn):
    return click.option("--threads", type=click.IntRange(min=1), default=None,
                        help="CPU threads for the runtime (default: all cores).")(fn)


def emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=_json_default))


def emit(obj, as_json: bool, line: str) -> None:
    """A command's result: its JSON document with --json, else one line for a person."""
    if as_json:
        emit_json(obj)
    else:
        click.echo(line)


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
                TextColumn("{task.fields[note]}", style="dim"),
                console=Console(stderr=True), transient=False,
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)
        return False

    def __call__(self, stage: str, done: int, total: int, note: str | None = None) -> None:
        """``note``: what the stage is doing now, shown after the bar."""
        if self._progress is None:
            return
        if stage not in self._tasks:
            self._tasks[stage] = self._progress.add_task(stage, total=total, note="")
        self._progress.update(self._tasks[stage], completed=done, total=total,
                              **({"note": note} if note is not None else {}))


def report_predictions(doc: dict, as_json: bool) -> None:
    """``predict``'s result (``doc["predictions"]``): JSON or a table; exit status 1 when a photo failed."""
    if as_json:
        emit_json(doc)
    else:
        print_predictions(doc["predictions"])
    if any("error" in p for p in doc["predictions"]):
        raise SystemExit(1)


def print_predictions(predictions: list[dict]) -> None:
    """One line per image: the best label and score, then the other top-k labels."""
    for p in predictions:
        if "error" in p:
            click.echo(f"{p['file']}: error: {p['error']}")
            continue
        if p.get("unknown"):
            guesses = ", ".join(f"{t['label']} {t['score']:.3f}" for t in p.get("top", []))
            click.echo(f"{p['file']}: unknown  [{guesses}]")
            continue
        rest = ", ".join(f"{t['label']} {t['score']:.3f}" for t in p.get("top", [])[1:])
        click.echo(f"{p['file']}: {p['label']} ({p['score']:.3f})" + (f"  [{rest}]" if rest else ""))


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
