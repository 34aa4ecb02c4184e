"""Command-line flags derived from what they fill, so that a setting's default and type are
written once, where the setting is defined: a field of a settings dataclass (``SuiteSettings``,
``PipelineSettings``, ``CurateSettings``, ``DataConfig``) or a parameter of the function a
command calls. The CLI adds only each flag's help text and, where it differs, its spelling.
``LazyParser`` adds a subcommand's flags only when that subcommand runs."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

REQUIRED = object()  # a parameter without a default


def parameters(target: Callable) -> dict[str, tuple[Any, Any]]:
    """name -> (annotation, default or REQUIRED) of a dataclass's fields or a function's
    parameters."""
    hints = typing.get_type_hints(target)
    if dataclasses.is_dataclass(target):
        found = {}
        for f in dataclasses.fields(target):
            if f.default_factory is not dataclasses.MISSING:
                found[f.name] = (hints[f.name], f.default_factory())
            else:
                found[f.name] = (hints[f.name], REQUIRED if f.default is dataclasses.MISSING else f.default)
        return found
    signature = inspect.signature(target).parameters.items()
    return {name: (hints.get(name), REQUIRED if p.default is p.empty else p.default) for name, p in signature}


def _lookup(target: Callable, dotted: str) -> tuple[Any, Any]:
    """The annotation and default of ``dotted``: a parameter, or (``data.fashion_mnist_root``)
    a field of a dataclass-typed parameter."""
    head, _, rest = dotted.partition(".")
    annotation, default = parameters(target)[head]
    return _lookup(_optional(annotation), rest) if rest else (annotation, default)


def _optional(annotation: Any) -> Any:
    """``X | None`` -> ``X``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(options) == 1:
            return options[0]
    return annotation


def add_flags(
    parser: argparse.ArgumentParser,
    target: Callable,
    helps: dict[str, str],
    flags: dict[str, str] | None = None,
    **argparse_options: dict[str, Any],
) -> None:
    """One flag per name in ``helps`` (in that order) for the parameter of that name of
    ``target`` (dotted: a field of a dataclass parameter), spelled ``--kebab-name`` unless
    ``flags`` says otherwise (a spelling without dashes is positional). Default and type come
    from ``target``: a bool that defaults to true becomes ``--no-NAME``, a tuple, list or
    sequence of X takes several values, a parameter without a default is required, and the
    help text shows the default. ``argparse_options[name]`` adds argparse keywords
    (``choices``, a ``type`` that parses)."""
    for name, text in helps.items():
        annotation, default = _lookup(target, name)
        kind = _optional(annotation)
        flag = (flags or {}).get(name, "--" + name.rsplit(".", 1)[-1].replace("_", "-"))
        options: dict[str, Any] = {"help": text}
        if kind is bool:
            flag = "--no-" + flag.removeprefix("--") if default else flag
            options["action"] = "store_false" if default else "store_true"
        elif typing.get_origin(kind) in (tuple, list, Sequence):
            options |= {"type": typing.get_args(kind)[0], "nargs": "+"}
        else:
            options["type"] = kind
        if not flag.startswith("-"):  # positional, shown as ``flag``
            parser.add_argument(name, metavar=flag, **options | argparse_options.get(name, {}))
            continue
        options["dest"] = name
        if "action" not in options:
            options["metavar"] = name.rsplit(".", 1)[-1].upper()
        if default is REQUIRED:
            options["required"] = True
        else:
            options["default"] = default
            if default is not None and default != () and not isinstance(default, bool) and "%(default)" not in text:
                options["help"] = f"{text} (default: %(default)s)"
        parser.add_argument(flag, **options | argparse_options.get(name, {}))


def build_from(target: Callable, args: argparse.Namespace, **values: Any) -> Any:
    """``target(**kwargs)``: each parameter from the flag of its name when the command has
    one (dotted flags fill a dataclass parameter, whose other fields keep their defaults), and
    ``values`` over both."""
    given = vars(args)
    nested: dict[str, dict[str, Any]] = {}
    for name, value in given.items():
        head, _, rest = name.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
    kwargs: dict[str, Any] = {}
    for name, (annotation, _) in parameters(target).items():
        if name in nested:
            kwargs[name] = _optional(annotation)(**nested[name])
        elif name in given:
            kwargs[name] = tuple(given[name]) if isinstance(given[name], list) else given[name]
    return target(**kwargs | values)


class LazyParser(argparse.ArgumentParser):
    """A (sub)command parser whose flags ``populate(parser)`` adds when it first parses or
    prints help: their defaults come from modules that can be slow to import."""

    def __init__(self, *args, populate: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._populate = populate

    def _flags(self) -> None:
        if self._populate is not None:
            populate, self._populate = self._populate, None
            populate(self)

    def parse_known_args(self, args=None, namespace=None):
        self._flags()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._flags()
        return super().format_help()


def parse_bytes(text: str) -> int:
    """``268435456``, ``256M``, ``256MiB``, ``1G`` -> bytes (binary units)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    raw = text.strip().upper().removesuffix("IB").removesuffix("B")
    number, unit = (raw[:-1], raw[-1]) if raw and raw[-1] in units else (raw, "")
    try:
        value = int(float(number) * units[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256M)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value
