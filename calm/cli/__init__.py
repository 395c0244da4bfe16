"""The ``calm`` console script: one table of commands, argument parsing, and the one error handler.

Each row of :data:`COMMANDS` names a command, its one-line help (what ``calm --help`` lists) and
the module of ``calm.cli`` that owns it. That module holds, per command, the function that adds its
arguments (``ARGUMENTS[name]``) and the command itself, ``cmd_<name>`` (dashes as underscores): a
thin function over a typed library function that a notebook or a test can call too. Only the
module of the command being run is imported, so ``calm --help`` loads neither torch nor the
models; ``calm.cli.cmd_<name>`` resolves every command's function from the table.

Known failures (bad configs, corrupt checkpoints, missing files, bad input) print one ``error:``
line that says what is wrong and how to fix it, and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any, NamedTuple, TextIO

from calm import __version__
from calm.config import ConfigError


class Command(NamedTuple):
    """One row of the table: ``calm NAME`` with its one-line help, owned by ``calm.cli.AREA``."""

    name: str
    help: str
    area: str
    computes: bool = True
    """Runs a model: the thread probe (``calm.hardware.configure_threads``) runs before it."""

    @property
    def function(self) -> str:
        """The command's function in its area module (and in ``calm.cli``)."""
        return "cmd_" + self.name.replace("-", "_")


COMMANDS: tuple[Command, ...] = (
    Command("prepare", "tokenize text into uint32 shards (+ a BPE tokenizer)", "data", computes=False),
    Command("convert", "convert the authors' CALM / autoencoder weights", "data", computes=False),
    Command("train-ae", "train the chunk autoencoder (stage 1)", "train"),
    Command("train-calm", "train CALM on a frozen autoencoder (stage 2)", "train"),
    Command("train-gpt", "train the token-level Transformer baseline", "train"),
    Command("finetune", "fine-tune a CALM or GPT on prompt/answer examples", "train"),
    Command("generate", "continue a prompt with a CALM or GPT checkpoint", "generate"),
    Command("serve", "OpenAI-compatible completions server for a checkpoint", "generate"),
    Command("eval", "BrierLM (+ perplexity for token LMs) on a text set", "eval"),
    Command("eval-ae", "reconstruction accuracy of an autoencoder", "eval"),
    Command("follow", "prompt following: retrieval AUC of continuations", "eval"),
    Command("flops", "analytic FLOPs per token (paper Table 1 accounting)", "eval", computes=False),
    Command("demo", "the main job: data, models, BrierLM, report, samples", "experiments"),
    Command("report", "rebuild the report of a demo, sweep or training run", "experiments", computes=False),
    Command("sweep", "train a grid of runs at a fixed budget; table + plot", "experiments"),
    Command("bench", "speed of CALM vs the GPT baseline (same backbone)", "experiments"),
)

_BY_NAME = {c.name: c for c in COMMANDS}
_BY_FUNCTION = {c.function: c for c in COMMANDS}


def _area(command: Command) -> ModuleType:
    return importlib.import_module(f"calm.cli.{command.area}")


def __getattr__(name: str) -> Callable[[argparse.Namespace], int]:
    """``calm.cli.cmd_<name>``: a command's function, from its area module."""
    if name in _BY_FUNCTION:
        return getattr(_area(_BY_FUNCTION[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The ``calm`` parser; every command is listed, and the arguments of ``commands`` (default: all) are added."""
    wanted = set(_BY_NAME) if commands is None else set(commands)
    width = max(len(c.name) for c in COMMANDS)
    parser = argparse.ArgumentParser(
        prog="calm",
        description="Continuous Autoregressive Language Models",
        epilog="commands:\n" + "\n".join(f"  {c.name:<{width}}  {c.help}" for c in COMMANDS),
        formatter_class=argparse.RawDescriptionHelpFormatter,  # the table above, one line per command
    )
    parser.add_argument("--version", action="version", version=f"calm {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help="one of the commands below; calm COMMAND --help"
    )
    for command in COMMANDS:
        p = sub.add_parser(command.name, description=command.help)
        if command.name in wanted:
            _area(command).ARGUMENTS[command.name](p)
            if not any(isinstance(a, argparse._SubParsersAction) for a in p._actions):
                add_threads_option(p)  # a command with subcommands (bench) gives each of them the option
    return parser


def add_threads_option(p: argparse.ArgumentParser) -> None:
    """``--threads N``, which every command takes (see :func:`set_threads`)."""
    p.add_argument(
        "--threads",
        type=int,
        help="CPU threads (default: one per core, fewer when a short probe finds the cores busy)",
    )


def set_threads(command: Command, requested: int | None) -> None:
    """Threads for this process: ``--threads`` as given (torch's pool, and the tokenizers library's),
    else, for a command that runs a model, what ``calm.hardware.configure_threads`` finds best for the
    machine's load, with a warning when that is fewer than one per core."""
    if requested is None and not command.computes:
        return
    from calm.hardware import configure_threads

    choice = configure_threads(requested)  # refuses requested < 1
    if requested is not None:
        os.environ["RAYON_NUM_THREADS"] = str(requested)  # tokenizers' pool, started on first use
    if (warning := choice.warning()) is not None:
        print(f"warning: {warning}", file=sys.stderr)


def _command_in(argv: list[str]) -> str | None:
    """The command word of ``argv``: its first word that is not an option (the top level takes no values)."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command_in(argv)
    args = build_parser([command] if command in _BY_NAME else []).parse_args(argv)
    progress_for_logs(sys.stderr)
    with warnings.catch_warnings():  # restores the default display when main returns
        warnings.showwarning = _show_warning
        return _dispatch(args)


LOG_PROGRESS_INTERVAL_S = 30
"""Seconds between progress-bar updates when the output is not a terminal (a log file)."""


def progress_for_logs(stream: TextIO) -> None:
    """Progress bars update every ``LOG_PROGRESS_INTERVAL_S`` seconds when ``stream`` is not a terminal,
    so that a log file gets a line now and then rather than hundreds of carriage-return updates. tqdm
    reads ``TQDM_MININTERVAL`` when it is first imported, which the commands do after this; a value the
    user set wins."""
    if not stream.isatty():
        os.environ.setdefault("TQDM_MININTERVAL", str(LOG_PROGRESS_INTERVAL_S))


def _show_warning(
    message: Warning | str,
    category: type,
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """Warnings, ours and libraries', read as one ``warning:`` line, not as Python source locations."""
    print(f"warning: {message}", file=sys.stderr)


KNOWN_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError, ValueError, PermissionError, OSError)

_LIBRARY_ERRORS = (("calm.checkpoint", "CheckpointError"), ("calm.train.loop", "NonFiniteError"))
"""Known errors that are not ValueErrors: (module, class). Their modules import torch, so they are
looked up only once loaded; an error class cannot have been raised before its module was imported."""


def _known_errors() -> tuple[type[BaseException], ...]:
    loaded = [getattr(sys.modules[module], name) for module, name in _LIBRARY_ERRORS if module in sys.modules]
    return (*KNOWN_ERRORS, *loaded)


def _dispatch(args: argparse.Namespace) -> int:
    command = _BY_NAME[args.command]
    func: Any = getattr(sys.modules[__name__], command.function)
    try:
        set_threads(command, args.threads)
        return int(func(args) or 0)
    except Exception as e:
        if not isinstance(e, _known_errors()):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
