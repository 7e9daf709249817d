"""Logging setup: human output goes to stderr so stdout can carry one JSON line."""

from __future__ import annotations

import logging
import sys

_CONFIGURED = False


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record (not the one at set-up), so output
    follows a redirected stderr — a test runner's capture, or a command run in-process by another."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property always reads sys.stderr
        pass


def setup_logging(verbose: bool = False) -> None:
    global _CONFIGURED
    level = logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger("superedit")
    if not _CONFIGURED:
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.propagate = False
        _CONFIGURED = True
    root.setLevel(level)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name if name.startswith("superedit") else f"superedit.{name}")
