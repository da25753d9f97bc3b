"""``edgetl``: one command per job."""

from __future__ import annotations

import click

from .. import __version__
from .common import set_verbose, setup_logging


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="edgetl")
@click.option("-v", "--verbose", is_flag=True,
              help="Also log informational messages, and show TensorFlow's own start-up and converter messages.")
def cli(verbose: bool) -> None:
    """Transfer learning at the edge: train on a workstation, export, keep learning on the device.

    \b
    Workstation:  edgetl train DATA_DIR --out RUN_DIR
                  edgetl eval    MODEL DATA_DIR
                  edgetl predict MODEL IMAGE...   (MODEL: run folder, bundle or .tflite/.onnx file)
                  edgetl export RUN_DIR --out models/NAME
                  edgetl bench RUN_OR_BUNDLE DATA_DIR
    Offline:      edgetl weights add FOLDER_OF_H5_FILES
    Device:       edgetl device --help   (needs only edgetl[device])
    All of it:    edgetl demo [--data PHOTOS]
    """
    setup_logging(verbose)
    set_verbose(verbose)


def _register() -> None:
    from . import device_cmds, export_cmds, train_cmds

    for cmd in (train_cmds.train, train_cmds.eval_cmd, train_cmds.predict, export_cmds.export, export_cmds.bench,
                device_cmds.device, train_cmds.demo, train_cmds.weights):
        cli.add_command(cmd)


_register()


def main() -> None:  # console-script entry point
    cli()


if __name__ == "__main__":
    main()
