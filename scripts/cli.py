"""The `saekit` command: one subcommand per verb, each a thin layer over a config dataclass and a
Python function.

A subcommand is declared by a config dataclass whose every field has a docstring (the style of
sparsify's configs); the flags, their help and their defaults are generated from it, so the
Python API and the CLI cannot drift apart. `--config FILE` (JSON or YAML) supplies the same
fields; flags given on the command line win over the file.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import errno
import functools
import importlib
import inspect
import json
import re
import signal
import sys
import textwrap
import threading
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..sae.errors import (
    SaekitError,
    clear_interrupts,
    on_signal,
    pending_signal,
    quiet_interrupts,
)

# name -> (one-line help, "module:ConfigClass", "module:function taking that config").
# A verb is listed here only once it works.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "cache": (
        "harvest activations into a verified, resumable on-disk cache",
        "saekit.activations.cache_config:CacheConfig",
        "saekit.activations.cache:build_cache",
    ),
    "cache-merge": (
        "join the caches written by `saekit cache --num-workers K` into one",
        "saekit.activations.cache_workers:MergeConfig",
        "saekit.activations.cache_workers:merge_cache",
    ),
    "train": (
        "train a sparse autoencoder on a cache, a live model or synthetic activations",
        "saekit.training.config:TrainConfig",
        "saekit.training.trainer:train",
    ),
    "evaluate": (
        "splice the SAE into the model and measure loss recovered",
        "saekit.diagnostics.evaluate:EvaluateConfig",
        "saekit.diagnostics.evaluate:evaluate",
    ),
    "demo": (
        "cache, train, evaluate and diagnose on the bundled default model",
        "saekit.scripts.demo:DemoConfig",
        "saekit.scripts.demo:demo",
    ),
    "diagnose": (
        "classify features, run the trajectory test and write the HTML report",
        "saekit.diagnostics.config:DiagnoseConfig",
        "saekit.diagnostics.diagnose:diagnose",
    ),
}


def _resolve(spec: Any) -> Any:
    """ "module:attr" imported on demand (so `saekit --help` loads no verb), or the object itself."""
    if not isinstance(spec, str):
        return spec
    module, attr = spec.split(":")
    return getattr(importlib.import_module(module), attr)


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass, read from its source."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:] + [None], strict=True):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


REQUIRED = object()


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per field of `cls`, with its docstring as help and its default shown."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        help_text = docs.get(f.name, "")
        help_text += " (required)" if required else f" (default: {default})"
        kwargs: dict[str, Any] = {
            "help": help_text.strip().replace("%", "%%"),
            "dest": f.name,
            "default": default,
        }
        origin = typing.get_origin(tp)
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is typing.Literal:
            kwargs["choices"] = list(typing.get_args(tp))
            kwargs["type"] = type(typing.get_args(tp)[0])
        elif origin in (list, tuple):
            (item,) = typing.get_args(tp)[:1]
            kwargs["nargs"] = "*"
            kwargs["type"] = item
        elif tp in (int, float, str, Path):
            kwargs["type"] = tp
        else:
            kwargs["type"] = str
        if required:
            # Not argparse-required: --config may supply it. parse() checks after merging.
            kwargs["default"] = REQUIRED
        parser.add_argument(flag, **kwargs)


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for k in names:
        tp, _ = _unwrap_optional(hints[k])
        if isinstance(getattr(args, k, None), list) and typing.get_origin(tp) not in (list, tuple):
            # argparse (< 3.12) turns `--flag=--` into an empty list instead of an error
            raise SaekitError(f"--{k.replace('_', '-')} needs one value; '--' is not one")
    return cls(**{k: v for k, v in vars(args).items() if k in names})


def read_config_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise SaekitError(f"config file {path} does not exist")
    try:
        text = p.read_text()
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)  # safe_load: plain data only, never Python objects
        else:
            data = json.loads(text)
    except Exception as e:  # JSON, YAML (yaml.YAMLError) or UTF-8 decoding errors
        kind = "YAML" if p.suffix in (".yaml", ".yml") else "JSON"
        raise SaekitError(f"config file {path} is not valid {kind} ({_first_line(e)})") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise SaekitError(f"config file {path} must hold a mapping of field names to values")
    return {k.replace("-", "_"): v for k, v in data.items()}


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def one_line(text: object) -> str:
    """An error message as one line (a path or a library's message may hold newlines)."""
    return " ".join(str(text).split())


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, `PROG: error: ...; see PROG --help`, exit 2
    (argparse's own prints the whole usage block first)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)}; see `{self.prog} --help`\n")


def file_value(path: str, cls: type, name: str, value: Any) -> Any:
    """A config file's value for field `name` of `cls`, checked against the field's type (and
    converted as its flag would convert it); SaekitError naming the file and the field."""
    tp, optional = _unwrap_optional(typing.get_type_hints(cls)[name])
    origin = typing.get_origin(tp)
    num = (int, float)

    def bad(what: str) -> SaekitError:
        return SaekitError(
            f"config file {path}: field {name} must be {what}, not {one_line(repr(value))}; fix the file"
        )

    def scalar(t: Any, v: Any, what: str) -> Any:
        if isinstance(v, bool) or isinstance(v, (dict, list)):
            raise bad(what)
        if t is int and isinstance(v, float):
            raise bad(what)  # 3.7 steps is a mistake, not a truncation to make silently
        try:
            return t(v)
        except (TypeError, ValueError):
            raise bad(what) from None

    if value is None:
        if optional:
            return None
        raise SaekitError(
            f"config file {path}: field {name} must not be null; give it a value or leave it out"
        )
    if tp is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices or isinstance(value, bool):
            raise bad("one of " + ", ".join(map(str, choices)))
        return value
    if origin in (list, tuple):
        (item,) = typing.get_args(tp)[:1]
        if not isinstance(value, list):
            raise bad(f"a list of {item.__name__}")
        return [scalar(item, v, f"a list of {item.__name__}") for v in value]
    if tp in (int, float):
        return scalar(tp, value, "an integer" if tp is int else "a number")
    if isinstance(value, (bool, dict, list)) or not isinstance(value, (str, *num)):
        raise bad("a string")
    return str(value)


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `verb`'s flags are built, so `saekit --help` imports no verb's module."""
    parser = Parser(
        prog="saekit",
        description="Train sparse autoencoders on transformer activations and study their features.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"saekit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, config_spec, _run) in COMMANDS.items():
        if name != verb:
            sub.add_parser(name, help=help_text, add_help=False)
            continue
        cls = _resolve(config_spec)
        p = sub.add_parser(
            name,
            help=help_text,
            description=(inspect.getdoc(cls) or help_text),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument(
            "--config",
            metavar="FILE",
            help="JSON or YAML file with the same fields as these flags; flags given here win",
        )
        add_dataclass_args(p, cls)
    return parser


def parse(argv: list[str] | None) -> tuple[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(verb if verb in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        raise SystemExit(0)
    help_text, config_spec, _run = COMMANDS[args.command]
    cls = _resolve(config_spec)
    sub = parser._subparsers._group_actions[0].choices[args.command]  # type: ignore[union-attr]
    if args.config:
        from_file = read_config_file(args.config)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(from_file) - names)
        if unknown:
            raise SaekitError(
                f"config file {args.config} has unknown fields {unknown}; valid: {sorted(names)}"
            )
        from_file = {k: file_value(args.config, cls, k, v) for k, v in from_file.items()}
        # Re-parse with the file's values as defaults, so flags given explicitly still win.
        sub.set_defaults(**from_file)
        args = parser.parse_args(argv)
    missing = [f"--{k.replace('_', '-')}" for k, v in vars(args).items() if v is REQUIRED]
    if missing:
        sub.error(f"the following arguments are required: {', '.join(missing)}")
    return args.command, config_from_args(cls, args)


def run_script(
    prog: str, doc: str | None, cls: type, fn: Callable[[Any], Any], argv: list[str] | None
) -> None:
    """`python -m scripts.X` for a pipeline script outside `saekit`: the same flags from a config
    dataclass, the same one-line errors and exit code 2."""
    p = Parser(
        prog=f"python -m {prog}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_dataclass_args(p, cls)
    args = p.parse_args(argv)
    missing = [f"--{k.replace('_', '-')}" for k, v in vars(args).items() if v is REQUIRED]
    if missing:
        p.error(f"the following arguments are required: {', '.join(missing)}")
    try:
        fn(config_from_args(cls, args))
    except SaekitError as e:
        print(f"{prog.rsplit('.', 1)[-1]}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def os_error_line(e: OSError) -> str:
    """One line for an OSError: the file, the problem, and what to do."""
    where = f"{e.filename}: " if e.filename else ""
    what = e.strerror or str(e) or type(e).__name__
    if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return (
            f"cannot write {where}{what} (disk full, quota or file-size limit); nothing "
            "half-written was kept: free space, then re-run the same command with --resume"
        )
    return f"{where}{what}"


def interrupted_line(command: str | None, signum: int) -> str:
    sig = signal.Signals(signum).name
    if command in ("cache", "train"):
        return f"interrupted ({sig}); every file written is whole: run the same command with --resume to continue"
    return f"interrupted ({sig}); run the command again (with --overwrite if it wrote part of its output)"


def failure(command: str | None, e: BaseException) -> tuple[int, str] | None:
    """(exit code, the one line) for a verb that raised `e`; None: a bug (the traceback shows).
    An error raised after a SIGINT/SIGTERM arrived is the signal's doing (its exception can land
    inside a library's import and leave it half-made): reported as the stop it asked for."""
    signum = getattr(e, "signum", None) or pending_signal()
    if isinstance(e, KeyboardInterrupt) or signum is not None:  # Ctrl-C, SIGTERM (Interrupted)
        signum = signum or signal.SIGINT
        return 128 + signum, interrupted_line(command, signum)
    if isinstance(e, SaekitError):
        return 2, one_line(e)
    if isinstance(e, OSError):  # the machine, not the input: a full disk, a file-size limit, ...
        return 1, os_error_line(e)
    if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and _OOM.search(str(e))):
        what = (_OOM.search(str(e)) or _OOM.search("out of memory")).group(0)  # type: ignore[union-attr]
        return 1, (
            f"{command or 'saekit'}: out of memory ({what}); use smaller sizes (for training: "
            "--features, --batch-size, --resample-inputs; docs/scaling.md counts them)"
        )
    return None


# torch's and numpy's words for a failed allocation (CPU, CUDA, MPS)
_OOM = re.compile(r"can't allocate memory|out of memory|[Uu]nable to allocate [^\n;]*")


def _install_handlers() -> dict:
    """SIGTERM, and SIGINT unless ignored (a background job's), raise Interrupted; returns the
    handlers to put back. Only the main thread can set them."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    old = {signal.SIGTERM: signal.signal(signal.SIGTERM, on_signal)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        old[signal.SIGINT] = signal.signal(signal.SIGINT, on_signal)
    return old


def _unraisable(others: Callable[[Any], None], u: Any) -> None:
    """Python cannot raise a signal's exception inside a weakref callback or a __del__ and
    prints it as "Exception ignored"; saekit acts on it at its next step (check_interrupt).
    `others`: the hook for every other unraisable exception."""
    if not isinstance(u.exc_value, KeyboardInterrupt):
        others(u)


def main(argv: list[str] | None = None) -> None:
    command = None
    previous = _install_handlers()
    hook = sys.unraisablehook
    sys.unraisablehook = functools.partial(_unraisable, hook)
    try:
        command, cfg = parse(argv)
        run: Callable[[Any], Any] = _resolve(COMMANDS[command][2])
        run(cfg)
        quiet_interrupts()  # (and first below: a signal now only counts)
    except (Exception, KeyboardInterrupt) as e:
        quiet_interrupts()
        how = failure(command, e)
        if how is None:
            raise
        print(f"saekit: error: {how[1]}", file=sys.stderr)
        raise SystemExit(how[0]) from None
    finally:
        if argv is not None:  # called in-process: the caller's handlers back (the program
            for sig, handler in previous.items():  # keeps saekit's, quiet, until it exits)
                signal.signal(sig, handler)
            sys.unraisablehook = hook
            clear_interrupts()


if __name__ == "__main__":
    main()
