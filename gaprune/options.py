"""Command-line options generated from config dataclasses, so a setting is declared once.

Each dataclass field becomes `--field-name` with the field's help text and default; a field
typed `bool` becomes a `--name/--no-name` switch. The parsed values build the dataclass back,
whose own validation then names any bad value.

Every command also reads a run file (`--config FILE`: YAML, JSON, which is YAML, or TOML) whose
settings stand in for typed flags, flags typed beside it winning, and prints its resolved
settings as such a file (`--print-config`). A file may group its settings in sections (as a run
folder's config.json does); the sections are for people, a setting's name is what counts.
"""
from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import tomllib
import types
import typing
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import yaml

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


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, title: str, skip: tuple[str, ...] = (),
                         only: tuple[str, ...] | None = None) -> None:
    """`only`: the fields a command takes from a config it otherwise sets itself (a benchmark's
    device and dtype), declared here all the same so their help and default live in one place."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init or (only is not None and f.name not in only):
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


_TYPED = object()  # marks options not typed on the command line


def add_run_file_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("run file")
    group.add_argument("--config", metavar="FILE", default=None,
                       help="read settings from FILE (YAML, JSON or TOML; sections allowed, e.g. a run folder's "
                            "config.json); flags typed beside it win")
    group.add_argument("--print-config", action="store_true",
                       help="print the resolved settings as YAML (a valid --config) and exit without running")


def read_run_file(path: str | Path) -> dict[str, Any]:
    """The settings of a run file by option name (`pop`, `data_dir`), sections flattened."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ValueError(f"--config {path}: cannot read it ({error.strerror})") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except Exception as error:  # the readers' own errors say where the file is malformed
        raise ValueError(f"--config {path}: not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected settings by name, got {type(data).__name__}")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        for name, setting in (value.items() if isinstance(value, dict) else [(key, value)]):
            name = str(name).replace("-", "_")
            if name in flat and flat[name] != setting:
                raise ValueError(f"--config {path}: {name} is set twice, to {flat[name]!r} and {setting!r}")
            flat[name] = setting
    return flat


def parse_with_run_file(parser: argparse.ArgumentParser, argv: Sequence[str]) -> tuple[argparse.Namespace, set[str]]:
    """Parse `argv` over the settings of its --config file; also return the names of the settings
    the user gave (typed or in the file), which a resumed run compares with its saved ones."""
    chosen, _ = _config_only().parse_known_args(argv)
    from_file: dict[str, Any] = {}
    if chosen.config:
        try:
            from_file = read_run_file(chosen.config)
        except ValueError as error:
            parser.error(str(error))
        unknown = sorted(set(from_file) - {action.dest for action in parser._actions} - {"config", "print_config", "help"})
        if unknown:
            parser.error(f"--config {chosen.config}: unknown setting(s) {', '.join(unknown)}")
        parser.set_defaults(**from_file)
    args = parser.parse_args(argv)
    marked = argparse.Namespace(**{action.dest: _TYPED for action in parser._actions})
    typed = {name for name, value in vars(parser.parse_args(argv, namespace=marked)).items() if value is not _TYPED}
    return args, (typed | set(from_file)) - {"config", "print_config"}


def _config_only() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config", default=None)
    return parser


def print_run_file(sections: dict[str, dict[str, Any]]) -> None:
    """Print resolved settings as a YAML run file (settings left unset are left out, so that a
    default computed at run time stays so)."""
    kept = {title: {k: v for k, v in values.items() if v is not None} for title, values in sections.items()}
    print(yaml.safe_dump(kept, sort_keys=False, default_flow_style=False), end="")


def resumed_folder(resume: str, out: str | None) -> Path:
    """The folder --resume continues; --out may name it again but not another (both commands
    write where they resume)."""
    if out and Path(out).resolve() != Path(resume).resolve():
        raise ValueError(f"--resume {resume} continues the run that writes that folder: --out {out} names another")
    return Path(resume)


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
