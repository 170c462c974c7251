"""`at2po keys`: CurveZMQ key pairs, needed before any role binds beyond loopback."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from common.transport import generate_keypair

keys_app = typer.Typer(
    help="Create CurveZMQ key pairs: services bind beyond loopback only with keys.",
    no_args_is_help=True,
)


@keys_app.callback()
def _keys() -> None:
    """CurveZMQ key pairs for services and clients."""
    # A callback keeps `keys` a command group, so `keys gen` works even while `gen` is its only command.


@keys_app.command("gen")
def gen(
    out: Annotated[Path, typer.Option("--out", help="directory to write the key files into")],
    name: Annotated[str, typer.Option("--name", help="key name, e.g. replay or actor-0")],
) -> None:
    """Write NAME.key (public) and NAME.key_secret (private, mode 0600) into --out."""
    try:
        public, secret = generate_keypair(out, name)
    except FileExistsError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=1) from None
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--name") from None
    typer.echo(f"public key: {public}")
    typer.echo(f"secret key: {secret}  (keep it private)")
    typer.echo(
        "\nFor a service (e.g. replay): set transport.server_secret_key to the secret file, give clients\n"
        "  the public .key file (their transport.server_public_key), and copy each client's .key file\n"
        "  into the service's transport.authorized_keys_dir.\n"
        "For a client (actor, learner): set transport.client_secret_key to the secret file and copy\n"
        "  the public .key file into the service's authorized_keys_dir."
    )
