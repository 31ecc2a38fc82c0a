"""Options and helpers shared by the commands: the MODEL argument, progress bars, JSON output."""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from wasi_compress.errors import UserError


def format_count(n: float | None) -> str:
    """A count as people read it: 88.22M, 4.41G."""
    if n is None:
        return "n/a"
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(int(n))


def _at_least_one(what: str) -> Callable:
    """A click callback refusing a value below 1 as one line naming the option (a UserError)."""

    def check(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise UserError(f"{param.opts[0]}: {value} is not {what}; give 1 or more")
        return value

    return check


def model_options(f: Callable) -> Callable:
    """MODEL plus the options that say how to load it (see wasi_compress.loading)."""
    decorators = [
        click.argument("model"),
        click.option("--arch", default=None, help="Architecture for a weights file: timm:<name> or package.module:factory."),
        click.option("--weights", default=None, type=click.Path(dir_okay=False), help="Weights for MODEL given as an architecture."),
        click.option("--trust-pickle", is_flag=True, help="Allow unpickling a torch file (can run code: only for files you trust)."),
        click.option("--trust-code", is_flag=True,
                     help="Let a checkpoint whose metadata names a package.module:factory import and call it (only for files you trust)."),
        click.option("--num-classes", type=int, default=None, callback=_at_least_one("a number of classes"),
                     help="Classifier size (1 or more), passed to timm or the factory."),
        click.option("--img-size", type=int, default=None, callback=_at_least_one("an image size"),
                     help="Input resolution (1 or more), passed to timm or the factory."),
        click.option("--seq-len", type=int, default=None, callback=_at_least_one("a sequence length"),
                     help="Tokens per example of a text model (hf: BERT, builtin:minilm); default 128."),
    ]
    for d in reversed(decorators):
        f = d(f)
    return f


def load_from_options(model: str, arch, weights, trust_pickle, trust_code, num_classes, img_size, seq_len=None):
    from wasi_compress.loading import load_model

    return load_model(model, arch=arch, weights=weights, trust_pickle=trust_pickle, trust_code=trust_code,
                      num_classes=num_classes, img_size=img_size, seq_len=seq_len)


def parse_float_list(text: str, what: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise UserError(f"{what}: expected comma-separated numbers such as 0.5,0.8,0.9, got {text!r}") from exc


def console_for(json_path: str | None) -> Console:
    """Human output goes to stderr when JSON goes to stdout, so `--json -` pipes cleanly. Off a
    terminal (CI logs, pipes) rich would wrap tables at 80 columns; 132 keeps layer tables readable."""
    console = Console(stderr=json_path == "-")
    return console if console.is_terminal else Console(stderr=json_path == "-", width=132)


@contextlib.contextmanager
def progress_bar(console: Console, description: str) -> Iterator[Callable[[int, int, str], None]]:
    """A rich progress bar driven by an on_progress(done, total, what) callback. Off a terminal it is
    disabled: there it would only leave a stray blank line in the output."""
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[what]}"), TimeElapsedColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task(description, total=None, what="")

        def update(done: int, total: int, what: str) -> None:
            progress.update(task, completed=done, total=total, what=what[:60])

        yield update


def device_option(f: Callable) -> Callable:
    return click.option("--device", default="cpu", show_default=True, help="torch device to run on (cpu, cuda, cuda:1, ...).")(f)


def check_device(device: str) -> str:
    """--device, checked before any work starts (one line and exit 2 if torch cannot use it)."""
    from wasi_compress.loading import resolve_device

    resolve_device(device)
    return device


def wraps_user_errors(f: Callable) -> Callable:
    """Errors from torch on bad shapes (e.g. a wrong --input-size) become one line, not a traceback. timm
    checks input sizes with assertions (torch._assert), so AssertionError is one of them."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        try:
            return f(*args, **kwargs)
        except (RuntimeError, ValueError, AssertionError) as exc:
            if isinstance(exc, UserError):
                raise
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            ctx = click.get_current_context(silent=True)
            name = ctx.info_name if ctx is not None else f.__name__
            raise UserError(f"{name} failed: {first}") from exc

    return wrapper


_CONTROL = {c: None for c in range(32) if c not in (9,)} | {127: None}


def plain(text) -> str:
    """Text for the terminal that came from a file or a model (notes, names): control characters
    (ANSI escapes that rewrite the screen) dropped, rich markup escaped, so it is shown, never obeyed."""
    from rich.markup import escape

    return escape(str(text).translate(_CONTROL))
