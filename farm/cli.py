"""The ``farm`` command."""

from __future__ import annotations

import logging
import os
import sys

import click
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from farm.commands.api import api
from farm.commands.bulk import bulk
from farm.commands.cancel import cancel
from farm.commands.db import db
from farm.commands.flower import flower
from farm.commands.generate import generate, status
from farm.commands.keys import keys
from farm.commands.usage import usage
from farm.commands.worker import models, worker
from farm.errors import FarmError, InvalidInputError

err_console = Console(stderr=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="lcm-farm")
@click.option("--log-level", default="WARNING", show_default=True, help="Log level of the CLI itself.")
def cli(log_level: str) -> None:
    """lcm-farm: a render farm for Latent Consistency Models."""
    logging.basicConfig(
        level=log_level.upper(), format="%(message)s", handlers=[RichHandler(console=err_console)]
    )


cli.add_command(generate)
cli.add_command(status)
cli.add_command(cancel)
cli.add_command(worker)
cli.add_command(models)
cli.add_command(db)
cli.add_command(api)
cli.add_command(keys)
cli.add_command(flower)
cli.add_command(bulk)
cli.add_command(usage)


def _print_error(markup: str) -> None:
    """An error on stderr, its lines as they are: a command in it (``hf download …``) is not cut by a newline
    at the console's width (the terminal wraps it), and brackets in it (``lcm-farm[worker]``) are kept."""
    err_console.print(markup, highlight=False, soft_wrap=True)


def main() -> None:
    code = 0
    try:
        cli(prog_name="farm")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            _print_error(escape(exc.code))
    except InvalidInputError as exc:
        _print_error(f"[red]error:[/red] {escape(str(exc))}")
        code = 2
    except FarmError as exc:
        _print_error(f"[red]error:[/red] {escape(str(exc))}")
        code = 1
    embedded = sys.modules.get("tasks.embedded")
    if embedded is not None and getattr(embedded, "busy_at_exit", False):
        # an in-process render is still running in a thread: leave without interpreter teardown
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
