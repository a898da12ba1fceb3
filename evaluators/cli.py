"""Command-line options generated from config dataclasses, so a setting is declared once.

Each dataclass field becomes `--field-name` with the field's help text and default; a field
typed `bool` becomes a `--name/--no-name` switch. The parsed values build the dataclass back,
whose own validation then names any bad value.
"""
from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import types
import typing
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

T = TypeVar("T")


class Settings:
    """Mixin for the config dataclasses: a plain-dict round trip (config.json, checkpoints)
    that names unknown keys instead of failing deep inside the constructor."""

    kind = "setting"  # how error messages call a field: "search setting", "healing setting", ...

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        if unknown:
            raise ValueError(f"unknown {cls.kind}(s): {', '.join(sorted(unknown))}")  # type: ignore[attr-defined]
        return cls(**data)


def _base_type(annotation: Any) -> type:
    """`int | None` -> int; `str` -> str (dataclass annotations may be strings under __future__)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    return annotation


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, title: str, skip: tuple[str, ...] = ()) -> None:
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        kind = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        flag = "--" + f.name.replace("_", "-")
        text = f.metadata.get("help", "")
        if kind is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            shown = "" if default is None else f" (default: {default})"
            group.add_argument(flag, dest=f.name, type=kind, default=default, help=text + shown,
                               metavar=f.name.upper())


def config_from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **overrides})


def say(message: str, progress: bool = True) -> None:
    """One line on stderr about the phase that starts now (progress bars cover the long ones)."""
    if progress:
        print(f"gaprune: {message}", file=sys.stderr, flush=True)


def fail(message: str, code: int = 2) -> typing.NoReturn:
    """Exit with a one-line error that names the problem (no traceback for user mistakes)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


class Terminated(KeyboardInterrupt):
    """SIGTERM (what SLURM and Kubernetes send before killing a job), raised where Ctrl-C would be."""

    exit_code = 143  # 128 + SIGTERM, the status a shell reports for a terminated job


@contextmanager
def terminate_like_interrupt() -> Iterator[Callable[[], None]]:
    """Within the block, SIGTERM stops the program the way Ctrl-C does, so that the same
    handlers save the checkpoint and print the resume hint. Python drops an exception raised
    while it runs a __del__ method or a weakref callback, so a signal can land where its
    exception is lost; the block gets a check that raises it again, for loops to call between
    steps."""
    received: list[int] = []

    def stop(signum: int, _frame: Any) -> None:
        received.append(signum)
        check()

    def check() -> None:
        if received:
            raise Terminated() if received[0] == signal.SIGTERM else KeyboardInterrupt()
    # A SIGINT already ignored (a job started in the background) stays ignored, as Python leaves it.
    handled = [signal.SIGTERM] + ([] if signal.getsignal(signal.SIGINT) == signal.SIG_IGN else [signal.SIGINT])
    previous = {number: signal.signal(number, stop) for number in handled}
    try:
        yield check
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def interrupt_status(error: KeyboardInterrupt) -> int:
    """Exit status for an interrupted command: 143 after SIGTERM, 130 after Ctrl-C."""
    return error.exit_code if isinstance(error, Terminated) else 130
