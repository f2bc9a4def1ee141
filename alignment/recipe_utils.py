"""What every recipe shares: a command-line parser whose help is right, and quiet logs.

:class:`RecipeParser` is ``trl.TrlParser`` (YAML via ``--config`` + flags) with three help fixes:
``--config`` is listed; the ``--no_<flag>`` switch that transformers adds for every boolean that
defaults to true says that it turns the option off (it used to repeat the option's own help, i.e.
the opposite); a help text that already states its default is not followed by a second
``(default: ...)``.

:func:`quiet_logs` silences the known noise of a CPU run that says nothing useful: DeepSpeed's
"Setting accelerator to CPU" (the accelerator is named instead of auto-detected when no GPU
exists) and transformers' "requires torchvision ... falling back to ...ImageProcessorPil" (this
project does not use torchvision). ``accelerate launch`` without ``--config_file`` prints the
defaults it used before any recipe code runs: pass ``--config_file recipes/accelerate/cpu.yaml``
(or a ZeRO config) as the recipes' docstrings do.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from trl import TrlParser


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: ...)`` only where the help does not already state a default, and
    never to a ``--no_<flag>`` switch (its 'default' is the option's, not the switch's)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if isinstance(action, argparse._StoreFalseAction) or "default" in text.lower():
            return text
        return super()._get_help_string(action)


class RecipeParser(TrlParser):
    """``trl.TrlParser`` with the help fixes of this module (parse with
    ``parse_args_and_config``)."""

    def __init__(self, dataclass_types: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        # no abbreviations: '--conf x' or '--lr 1e-4' would be taken for another option
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(dataclass_types, **kwargs)
        for action in self._actions:
            if isinstance(action, argparse._StoreFalseAction) and any(
                o.startswith("--no_") for o in action.option_strings
            ):
                action.help = f"Turn --{action.dest} off (set it to false)."
        # TrlParser reads --config itself before argparse runs; this entry only lists it
        self.add_argument(
            "--config",
            default=argparse.SUPPRESS,
            metavar="FILE.yaml",
            help="YAML file of option values (flags given on the command line override it).",
        )

    def parse_args_and_config(self, args: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """``TrlParser``'s, with ``--config=FILE`` read as ``--config FILE`` (TrlParser only
        finds the YAML in the second form; the first one went to argparse and the file was
        silently ignored)."""
        argv = list(sys.argv[1:] if args is None else args)
        split: list[str] = []
        for a in argv:
            split += a.split("=", 1) if a.startswith("--config=") else [a]
        return super().parse_args_and_config(args=split, **kwargs)


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


def quiet_logs() -> None:
    """Silence the known log noise (see the module docstring); call before building models."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logger = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _DropMessages) for f in logger.filters):
        logger.addFilter(_DropMessages("requires torchvision"))


def parse_recipe_args(dataclass_types: Any, argv: Sequence[str] | None = None) -> tuple:
    """:func:`quiet_logs`, then parse the command line (and ``--config`` YAML) into the
    dataclasses."""
    quiet_logs()
    return RecipeParser(dataclass_types).parse_args_and_config(args=argv)


__all__ = ["RecipeParser", "parse_recipe_args", "quiet_logs"]
