"""The ``nnbridge`` command: thin commands over the library.

Each command has ``configure_parser`` (testable without argv) and a ``run`` that calls
the library. Errors are one clear line on stderr (``--debug`` shows the traceback);
exit codes: 0 ok, 1 verification failed, 2 bad input or failed step.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from nnbridge._version import __version__
from nnbridge.errors import NNBridgeError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2

Command = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Command, str]] = {}


def command(name: str, help_text: str) -> Callable[[Callable[[argparse.ArgumentParser], None]], Any]:
    """Register a subcommand: decorate its ``configure_parser``; the parser sets ``func``."""
    def wrap(configure: Callable[[argparse.ArgumentParser], None]) -> Callable[[argparse.ArgumentParser], None]:
        _COMMANDS[name] = (configure, None, help_text)  # type: ignore[assignment]
        return configure
    return wrap


def _console(quiet: bool = False) -> Any:
    from rich.console import Console

    return Console(quiet=quiet, highlight=False, soft_wrap=True)


def _printable(text: str, keep: str = "") -> str:
    """``text`` with control and format characters (terminal escapes, bidi overrides) written as escapes."""
    return "".join(ch if ch.isprintable() or ch in keep else ascii(ch)[1:-1] for ch in text)


def shown(text: object) -> str:
    """Text that came from files or the command line (names, paths, messages), safe to print with rich.

    Its ``[...]`` are not markup and its control characters cannot drive the terminal;
    newlines are kept (summaries span lines).
    """
    from rich.markup import escape

    return escape(_printable(str(text), keep="\n"))


# ---------------------------------------------------------------- inspect
@command("inspect", "describe a spec (.json), weights (.nmw) or checkpoint (.pt/.pt2/.safetensors/.npz)")
def _configure_inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="file to describe")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.epilog = "example: nnbridge inspect weights.nmw"
    p.set_defaults(func=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> int:
    from nnbridge.inspect import inspect_file

    info = inspect_file(args.file)
    if args.json:
        sys.stdout.write(json.dumps(info, indent=2, default=str) + "\n")
        return EXIT_OK
    con = _console(args.quiet)
    _render_inspect(con, info)
    return EXIT_OK


def _render_inspect(con: Any, info: dict[str, Any]) -> None:
    from rich.table import Table

    con.print(f"[bold]{shown(info['file'])}[/bold]  ({info['kind']})")
    if "summary" in info:
        con.print(shown(info["summary"]))
    if info.get("problems"):
        con.print("[red]problems:[/red]")
        for prob in info["problems"]:
            con.print(f"  - {shown(prob)}")
    if info.get("tensors"):
        t = Table(title="tensors")
        for col in ("name", "shape", "min", "max", "mean", "std"):
            t.add_column(col, justify="left" if col == "name" else "right")
        for s in info["tensors"]:
            def f(v: Any) -> str:
                return "-" if v is None else f"{v:.4g}"
            t.add_row(shown(s["name"]), "x".join(map(str, s["shape"])), f(s["min"]), f(s["max"]), f(s["mean"]),
                      f(s["std"]) + (f" ({s['nonfinite']} non-finite)" if s["nonfinite"] else ""))
        con.print(t)
    if info["kind"] == "nmw":
        con.print(f"NMW version {info['version']}, {info['size']} bytes; integrity: {info['integrity']}")
        if info.get("trailer"):
            con.print("provenance: " + shown(json.dumps(info["trailer"], default=str)))
        if not info.get("nim_portable", True):
            con.print("[yellow]note:[/yellow] uses settings the Nim library does not know; not portable to it")
    for key in ("source_kind", "convertible", "reason"):
        if key in info:
            con.print(f"{key}: {shown(info[key])}")
    for w in info.get("warnings", []):
        con.print(f"[yellow]warning:[/yellow] {shown(w)}")


# ------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (all subcommands)."""
    _load_commands()
    parser = argparse.ArgumentParser(
        prog="nnbridge",
        description="Move trained PyTorch/MLX networks to NMW weights, Metal kernels and Nim code, verified.",
    )
    parser.add_argument("--version", action="version", version=f"nnbridge {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    common.add_argument("--quiet", "-q", action="store_true", help="print only errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (configure, _, help_text) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        configure(p)
    return parser


def _load_commands() -> None:
    """Import the modules that register further commands (convert, verify, …)."""
    import importlib

    for mod in ("nnbridge.commands",):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


MAX_ERROR_LINE = 2000


def one_line(message: str) -> str:
    """An error message as one printable terminal line.

    Lines are joined (``"x is invalid:\\n  - why"`` → ``"x is invalid: why"``); control
    characters a message may carry from user text (names, paths) are escaped, so they can
    neither break the line nor drive the terminal; overlong words (a 10 000-character name,
    not a path) are shortened, and an overlong message keeps its head (what failed) and its
    tail (what to do).
    """
    parts = [x.strip().lstrip("- ").strip() for x in message.strip().splitlines()]
    msg = ""
    for p in (p for p in parts if p):
        msg = p if not msg else (msg + " " if msg.endswith(":") else msg + "; ") + p
    msg = _printable(msg)
    msg = re.sub(r"[^\s/\\]{256,}", lambda m: f"{m[0][:100]}…{m[0][-60:]}", msg)  # longer than any file name
    if len(msg) > MAX_ERROR_LINE:
        msg = msg[: MAX_ERROR_LINE * 2 // 3] + " … " + msg[-(MAX_ERROR_LINE // 3):]
    return msg


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nnbridge`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        return int(args.func(args))
    except NNBridgeError as e:
        if args.debug:
            raise
        sys.stderr.write(f"error: {one_line(str(e))}\n")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
