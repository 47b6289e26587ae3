"""`visiond opcua make-cert`: the OPC UA door's self-signed application certificate and key.

A secured OPC UA endpoint needs a certificate whose application URI is the server's
(`urn:visiond:<node>`, the node of the daemon's config) and whose names include the host
clients connect to; PLC and SCADA clients are then told to trust `cert.der`.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import List, Optional

import typer

from visiond.config import NAME_PATTERN
from visiond.errors import UserError

opcua_app = typer.Typer(name="opcua", help="The OPC UA door: certificates.", no_args_is_help=True,
                        add_completion=False)


@opcua_app.command("make-cert")
def make_cert(
    out: Path = typer.Option(..., "--out", help="Folder for cert.pem, cert.der and key.pem (created if missing)."),
    node: Optional[str] = typer.Option(None, "--node", help="The daemon's node name (config `node`; default: this "
                                                            "host's name): the URI is urn:visiond:<node>."),
    host: List[str] = typer.Option([], "--host", help="A host name or IP address clients connect to (repeatable); "
                                                     "this host's name, localhost and 127.0.0.1 are always in."),
    days: int = typer.Option(3650, "--days", help="Validity in days."),
    force: bool = typer.Option(False, "--force", help="Replace certificate files already in --out."),
) -> None:
    """Write a self-signed certificate (RSA 2048, SHA-256) and key for the OPC UA server."""
    from visiond.serve.doors.opcua import make_certificate, namespace_uri  # asyncua loads only for this command

    node = node or socket.gethostname().split(".")[0] or "visiond"
    if not re.match(NAME_PATTERN, node):
        raise UserError(f"--node: got {node!r}, expected the config's node name (letters, digits, _ . -; 1 to 64)")
    cert_pem, cert_der, key_pem = make_certificate(out, node, list(host), days=days, overwrite=force)
    typer.echo(f"wrote {cert_pem}, {cert_der} and {key_pem} (application URI {namespace_uri(node)}, "
               f"valid {days} days)")
    typer.echo(f"config: opcua: {{cert: {cert_pem}, key: {key_pem}}}; give clients {cert_der} to trust")


def register(app: typer.Typer) -> None:
    app.add_typer(opcua_app, name="opcua")
