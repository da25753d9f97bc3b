"""``edgetl``: one command per job."""

from __future__ import annotations

import click

from .. import __version__
from .common import setup_logging


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="edgetl")
@click.option("-v", "--verbose", is_flag=True, help="Also log informational messages to stderr.")
def cli(verbose: bool) -> None:
    """Transfer learning at the edge: train on a workstation, export, keep learning on the device.

    \b
    Workstation:  edgetl train DATA_DIR --out RUN_DIR
                  edgetl eval  RUN_OR_BUNDLE_OR_FILE DATA_DIR
                  edgetl predict RUN_OR_BUNDLE_OR_FILE IMAGE...
                  edgetl export RUN_DIR --out models/NAME
                  edgetl bench RUN_OR_BUNDLE DATA_DIR
    Device:       edgetl device --help   (needs only edgetl[device])
    All of it:    edgetl demo [--data PHOTOS]
    """
    setup_logging(verbose)


def _register() -> None:
    from . import device_cmds, export_cmds, train_cmds

    for cmd in (train_cmds.train, train_cmds.eval_cmd, train_cmds.predict, export_cmds.export, export_cmds.bench,
                device_cmds.device, train_cmds.demo):
        cli.add_command(cmd)


_register()


def main() -> None:  # console-script entry point
    cli()


if __name__ == "__main__":
    main()
