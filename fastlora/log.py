"""fastlora's logging: every module logs to a child of the "fastlora" logger, which has one handler
of its own (stderr, "fastlora: message") and level INFO, so training progress shows by default.

    import fastlora as fl
    fl.set_verbosity("warning")      # progress lines off; warnings and errors only
    fl.set_verbosity("debug")        # everything

FASTLORA_VERBOSITY=warning (or debug, info, error) sets the starting level. A program that
configures logging itself can take the records instead: logging.getLogger("fastlora").handlers
holds the one handler to remove, and propagate is False until it sets it back to True.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Optional, Union

ROOT = "fastlora"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
          "critical": logging.CRITICAL}


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (pytest and notebooks swap it)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _root():
    logger = logging.getLogger(ROOT)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers) and not getattr(logger, "_fastlora", False):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("fastlora: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
        logger._fastlora = True  # configured once, even if the program later removes the handler
        logger.setLevel(_level(os.environ.get("FASTLORA_VERBOSITY", "info"), "FASTLORA_VERBOSITY"))
    return logger


def _level(level, where="level"):
    if isinstance(level, int) and not isinstance(level, bool):
        return level
    if isinstance(level, str) and level.lower() in LEVELS:
        return LEVELS[level.lower()]
    raise ValueError(f"{where} must be one of {', '.join(LEVELS)} or a logging level number, got {level!r}")


def get_logger(name: Optional[str] = None) -> logging.Logger:
    """The logger of a fastlora module: get_logger(__name__) ("fastlora.train.trainer" -> a child
    of "fastlora"), or the library's own logger when name is None."""
    root = _root()
    if not name or name == ROOT:
        return root
    return logging.getLogger(name if name.startswith(ROOT + ".") else f"{ROOT}.{name}")


def set_verbosity(level: Union[int, str]) -> None:
    """Set how much fastlora logs: "debug", "info" (the default: progress lines), "warning",
    "error", "critical", or a logging level number."""
    _root().setLevel(_level(level))


def get_verbosity() -> int:
    """The "fastlora" logger's level, as a logging level number (logging.INFO is 20)."""
    return _root().getEffectiveLevel()
