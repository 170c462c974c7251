"""`at2po config ...`: show a resolved configuration, or the reference of every key."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from pydantic import BaseModel

from common.config import RunConfig, dump_config
from ops.replay_cmd import load_or_exit

config_app = typer.Typer(help="Run configuration: resolved values and the key reference.", no_args_is_help=True)


@config_app.command("show")
def show(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML run configuration")] = None,
    overrides: Annotated[list[str] | None, typer.Option("--set", help="section.key=value")] = None,
) -> None:
    """Print the configuration after the file and overrides are applied (validated)."""
    typer.echo(dump_config(load_or_exit(config, overrides)))


def reference_markdown() -> str:
    """A Markdown table of every key: dotted name, type, default, meaning."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for section_name, section_field in RunConfig.model_fields.items():
        section = section_field.annotation
        assert isinstance(section, type) and issubclass(section, BaseModel)
        for key, field in section.model_fields.items():
            annotation = str(field.annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
            annotation = annotation.replace(" | ", " or ")
            default = field.get_default(call_default_factory=True)
            meaning = (field.description or "").replace("|", "/")
            rows.append(f"| `{section_name}.{key}` | `{annotation}` | `{default!r}` | {meaning} |")
    return "\n".join(rows)


@config_app.command("reference")
def reference() -> None:
    """Print the Markdown reference of every configuration key (README's table)."""
    typer.echo(reference_markdown())
