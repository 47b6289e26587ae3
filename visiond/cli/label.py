"""`visiond label DATASET_DIR`: serve the labelling page for the dataset's inbox until Ctrl-C or SIGTERM."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Optional

import typer


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM takes the same path as Ctrl-C


def label(
    dataset_dir: Path = typer.Argument(..., help="Dataset directory; images waiting in DATASET_DIR/inbox/."),
    bind: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 shares the page on the network)."),
    port: int = typer.Option(8765, help="TCP port (0 picks a free one)."),
    allow_host: list[str] = typer.Option(
        [], "--allow-host", metavar="NAME", help="A host name the page may be opened by (repeatable), e.g. this box's name on "
                                 "the plant network; localhost and IP addresses always work."),
    classes: Optional[str] = typer.Option(
        None, help="Comma-separated classes offered first, in this order (keys 1..9); the manifest's classes "
                   "and the model's predicted labels follow."),
):
    """Label the inbox in a local web page: number keys choose, Enter accepts, Backspace undoes."""
    from visiond.data.inbox import list_inbox
    from visiond.label.server import make_server
    from visiond.logs import setup_logging

    setup_logging("info")
    names = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    server = make_server(dataset_dir, bind=bind, port=port, classes=names, allow_hosts=allow_host)
    if bind not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"visiond label: listening on {bind}: anyone who can reach this port can label", err=True)
    typer.echo(f"visiond label: {len(list_inbox(dataset_dir))} image(s) in {dataset_dir}/inbox; "
               f"classes: {', '.join(server.session.classes) or 'none yet (add one on the page)'}")
    typer.echo(f"visiond label: open {server.url}  (Ctrl-C to stop)", nl=True)
    signal.signal(signal.SIGTERM, _stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.session.close()
    typer.echo("visiond label: stopped")


def register(app: typer.Typer) -> None:
    app.command("label")(label)
