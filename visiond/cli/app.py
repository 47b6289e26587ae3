"""`visiond` entry point: sub-commands from the modules beside this one.

Errors the user can fix (config, checkpoint, data) print one line and exit 2,
never a traceback.
"""

from __future__ import annotations

import importlib
import os
import sys

os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")  # FFmpeg retry chatter; visiond logs its own one-liners

import typer

from visiond import __version__

app = typer.Typer(
    name="visiond",
    help="Real-time vision daemon for factory lines, and the tools that build its model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Each module registers its commands on `app` with a `register(app)` function.
_COMMAND_MODULES = ("visiond.cli.run", "visiond.cli.dataset", "visiond.cli.model", "visiond.cli.label",
                    "visiond.cli.capture", "visiond.cli.loop", "visiond.cli.results", "visiond.cli.opcua",
                    "visiond.cli.tune")


def _version(value: bool):
    if value:
        typer.echo(f"visiond {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version.")):
    """visiond: camera -> CNN -> MQTT + Prometheus."""


def register_commands(target: typer.Typer, modules: tuple[str, ...] = _COMMAND_MODULES) -> None:
    """Every command group, or an ImportError naming the module: a group that fails to import is a broken
    install, and `visiond` without it would hide that behind "No such command"."""
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise ImportError(f"visiond: the commands in {name} cannot be loaded: {exc}", name=name) from exc
        module.register(target)


register_commands(app)


def user_errors() -> tuple[type[BaseException], ...]:
    from visiond.config import ConfigError
    from visiond.errors import UserError

    return (UserError, ConfigError)


def main() -> None:
    try:
        app()
    except user_errors() as exc:
        for line in str(exc).splitlines() or [exc.__class__.__name__]:
            print(f"visiond: error: {line}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:
        print("visiond: interrupted", file=sys.stderr)
        sys.exit(130)
