"""Command-line pieces shared by the tools: one help format and the range-checked argument types.

Conventions of every tool: argparse's exit status 2 for a bad command line, 1 for work that failed
(one line ``<tool>: error: ...`` on stderr), 0 for success.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option's help (not for required options, flags, or options without
    a default); the description kept as written, line breaks included."""

    def _get_help_string(self, action):
        if action.required or action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def int_at_least(minimum: int, what: str | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer of at least ``minimum``, else a usage error saying so
    (``expected <what>, got ...`` when ``what`` names the value, e.g. "a positive integer")."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what or 'an integer'}, got {text!r}") from None
        if value < minimum:
            message = f"expected {what}, got {value}" if what else f"must be at least {minimum}, got {value}"
            raise argparse.ArgumentTypeError(message)
        return value
    return parse


def split_fraction(text: str) -> float:
    """An argparse ``type``: a share in [0, 1) (a validation or test fraction, a minimum share)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def positive_float(text: str) -> float:
    """An argparse ``type``: a number > 0 (a learning rate, a bandwidth)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value
