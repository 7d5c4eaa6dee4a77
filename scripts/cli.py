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
import importlib
import inspect
import json
import sys
import textwrap
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sae.errors import SaekitError

# name -> (one-line help, "module:ConfigClass", "module:function taking that config").
# A verb is listed here only once it works.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "cache": (
        "harvest activations into a verified, resumable on-disk cache",
        "activations.cache:CacheConfig",
        "activations.cache:build_cache",
    ),
    "cache-merge": (
        "join the caches written by `saekit cache --num-workers K` into one",
        "activations.cache_workers:MergeConfig",
        "activations.cache_workers:merge_cache",
    ),
    "train": (
        "train a sparse autoencoder on a cache",
        "training.config:TrainConfig",
        "training.trainer:train",
    ),
    "evaluate": (
        "splice the SAE into the model and measure loss recovered",
        "diagnostics.evaluate:EvaluateConfig",
        "diagnostics.evaluate:evaluate",
    ),
    "demo": (
        "cache, train, evaluate and diagnose on the bundled default model",
        "scripts.demo:DemoConfig",
        "scripts.demo:demo",
    ),
    "diagnose": (
        "classify features, run the dying test and write the HTML report",
        "diagnostics.report:DiagnoseConfig",
        "diagnostics.report:diagnose",
    ),
}


def _resolve(spec: str) -> Any:
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
    return cls(**{k: v for k, v in vars(args).items() if k in names})


def read_config_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise SaekitError(f"config file {path} does not exist")
    text = p.read_text()
    if p.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise SaekitError(f"config file {path} must hold a mapping of field names to values")
    return {k.replace("-", "_"): v for k, v in data.items()}


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `verb`'s flags are built, so `saekit --help` imports no verb's module."""
    parser = argparse.ArgumentParser(
        prog="saekit",
        description="Train sparse autoencoders on transformer activations and study their features.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    p = argparse.ArgumentParser(
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


def main(argv: list[str] | None = None) -> None:
    try:
        command, cfg = parse(argv)
        run: Callable[[Any], Any] = _resolve(COMMANDS[command][2])
        run(cfg)
    except SaekitError as e:
        print(f"saekit: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("saekit: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
