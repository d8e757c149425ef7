"""The one exception type for mistakes a user can make (bad config, missing data, ...).

Anything raised as `UserError` is reported by the CLI as a single line on stderr with exit code 2,
and Prefect does not retry a task that failed with it: retrying cannot fix a wrong input.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input; the message names the key, file or value at fault."""


def is_user_error(exc: BaseException) -> bool:
    """True for errors a retry cannot fix. attention_core's ConfigError never reaches this far: the
    model config is validated with the rest of the pipeline config, into a UserError."""
    return isinstance(exc, UserError)
