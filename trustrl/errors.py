"""The one error style: a failure the user can fix is a :class:`UserError`.

Anticipated failures -- a bad config key, a malformed data row, a directory that is not a
model, a reward that cannot be resolved or fails, a sandbox that cannot be set up, an
environment that misbehaves -- raise a subclass of :class:`UserError` whose message names the
file / row / key / function at fault. ``trustrl``'s command line prints such a message on
one or a few lines and exits non-zero *without* a traceback; ``--debug`` (or the environment
variable ``TRUSTRL_DEBUG=1``) prints the traceback as well. Anything else is a bug and keeps
its traceback.

The existing error classes keep their standard bases, so ``except ValueError`` still catches
a :class:`trustrl.config.ConfigError`::

    ConfigError(UserError, ValueError)        trustrl.config        a setting, naming the key
    DataError(UserError, ValueError)          trustrl.data          a file / row / column
    ModelLoadError(UserError, ValueError)     trustrl.models        a model or tokenizer directory
    RewardSpecError(UserError, ValueError)    trustrl.rewards       a reward that cannot be used
    RewardError(UserError, RuntimeError)      trustrl.rewards       a reward that failed on samples
    CheckpointError(UserError, RuntimeError)  trustrl.checkpoint    an unusable checkpoint
    NonFiniteError(UserError, RuntimeError)   trustrl.trainers      too many non-finite updates
    SandboxError(UserError, RuntimeError)     trustrl.rewards.code  no sandbox mode works here

This module imports nothing (the config schemas and every layer may use it).
"""

from __future__ import annotations

import os

__all__ = ["DEBUG_ENV", "UserError", "cause_summary", "debug_requested"]

#: Environment variable that turns on tracebacks for user errors (any value but "", "0", "false").
DEBUG_ENV = "TRUSTRL_DEBUG"


class UserError(Exception):
    """A failure the user can fix by changing an input; its message says which and where."""


def debug_requested() -> bool:
    """True when ``TRUSTRL_DEBUG`` is set to something other than "", "0", "false", "no"."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def cause_summary(err: BaseException, max_chars: int = 300) -> str:
    """One line for a wrapped exception from a library: ``"TypeName: first line of message"``,
    cut at ``max_chars`` (its full text and traceback are shown with ``--debug``)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    text = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    if len(lines) > 1:
        text += " ..."
    return text if len(text) <= max_chars else text[: max_chars - 3].rstrip() + "..."
