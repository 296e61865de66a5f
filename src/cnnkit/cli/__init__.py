"""The ``cnnkit`` command. Each submodule adds its subcommands; this file only dispatches.

Errors a user can cause (``CnnkitError``), and file-system errors no command foresaw (``OSError``), print
one line ``error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from cnnkit import __version__
from cnnkit.cli.argtypes import parameter_count
from cnnkit.errors import CnnkitError

# Modules that define subcommands, in the order `cnnkit --help` lists them. Each has
# ``register(subparsers)`` that adds parsers with ``set_defaults(func=...)``.
COMMAND_MODULES = [
    "cnnkit.cli.demo",
    "cnnkit.cli.train",
    "cnnkit.cli.augment",
    "cnnkit.cli.zoo",
    "cnnkit.cli.segment",
    "cnnkit.cli.dense",
    "cnnkit.cli.studies",
    "cnnkit.cli.lecture",
]


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and exit status 2."""

    def error(self, message: str):  # noqa: D401
        sys.stderr.write(f"error: {message} (see `{self.prog} --help`)\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="cnnkit",
        description="Convolutional networks from the lecture by X. Wang (2015): train, evaluate, "
        "inspect and run the classic models, and classify every pixel exactly in one pass.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `cnnkit COMMAND --help` for the options of each command. `cnnkit demo` is the "
        "quickest start.",
    )
    parser.add_argument("--version", action="version", version=f"cnnkit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--max-params", type=parameter_count, default=None, metavar="N",
                        help="the most parameters a model built from a checkpoint may have (default: 2e9, or "
                        "$CNNKIT_MAX_PARAMS); a file asking for more is refused before anything is built")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _command_parser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The parser of the (sub)command named in ``argv`` (``cnnkit segment train``), else ``parser``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for i, token in enumerate(argv):
                if token in action.choices:
                    return _command_parser(action.choices[token], argv[i + 1:])
    return parser


def one_line(exc: Exception) -> str:
    """The user-facing line of an error, also when PyTorch re-raised it from a DataLoader worker
    (its message then holds the worker's traceback, whose last line is the original error)."""
    text = str(exc).strip()
    if "Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text.splitlines()[0] if text else type(exc).__name__


def os_error_line(exc: OSError) -> str:
    """The user-facing line of a file-system error (disk full, permission denied, ...), naming its path."""
    reason = exc.strerror or one_line(exc)
    if exc.filename is None:
        return f"{reason}; check the paths given, their permissions and the free disk space"
    return f"cannot use {exc.filename}: {reason}; check the path, its permissions and the free disk space"


class ConsoleHandler(logging.Handler):
    """Progress messages (INFO, DEBUG with -v) to stdout with the command's other output, warnings and
    errors to stderr, so that a failing command's stderr is its one error line (plus real warnings).
    Written through tqdm so that a progress bar on the terminal is not torn; the stream is looked up
    when a record is written, so redirected streams are honoured."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            warn = record.levelno >= logging.WARNING
            text = self.format(record)
            if warn and not text.startswith(("error:", "warning:")):
                text = f"{record.levelname.lower()}: {text}"
            tqdm.write(text, file=sys.stderr if warn else sys.stdout)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def _configure_logging(verbose: bool, quiet: bool = False) -> None:
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if not isinstance(h, ConsoleHandler)]
    handler = ConsoleHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args, extra = parser.parse_known_args(argv)
    if extra:  # named by the command that was given, whose --help lists what it takes
        _command_parser(parser, argv).error(f"unrecognized arguments: {' '.join(extra)}")
    if args.max_params is not None:
        from cnnkit.train.checkpoint_schema import MAX_PARAMS_ENV

        os.environ[MAX_PARAMS_ENV] = str(args.max_params)
    # progress messages share stdout with the output: none when the output is JSON for a program to read
    _configure_logging(args.verbose, quiet=bool(getattr(args, "json", False)))
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CnnkitError as exc:
        sys.stderr.write(f"error: {one_line(exc)}\n")
        return 2
    except OSError as exc:  # a file-system failure no command turned into a CnnkitError: still one line
        sys.stderr.write(f"error: {os_error_line(exc)}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: the last completed checkpoint is kept; use --resume to continue\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
