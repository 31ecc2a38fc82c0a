"""Entry point of the `wasi-compress` command. Each subcommand lives in its own module and only
parses options, calls the Python API and renders the result."""

from __future__ import annotations

import sys

import click

from wasi_compress.errors import UserError


class _Group(click.Group):
    """Turns a UserError into one line on stderr and exit code 2, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except click.UsageError as exc:  # click's own block is four lines; bad usage is bad input: one line
            message = " ".join(exc.format_message().split())
            where = exc.ctx.command_path if exc.ctx is not None else ctx.command_path
            click.echo(f"error: {message} (see '{where} -h')", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("error: interrupted; no output was written", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="wasi-compress")
def main() -> None:
    """Compress vision transformers with WASI: analyze, convert under a byte budget, fine-tune in low
    memory, and gate models in CI."""


def _register() -> None:
    import importlib

    for name in ("analyze", "convert", "finetune", "check", "report"):
        try:
            module = importlib.import_module(f"wasi_compress.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"wasi_compress.cli.{name}":
                continue  # command not built yet
            raise
        main.add_command(module.command)


_register()

if __name__ == "__main__":
    main()
