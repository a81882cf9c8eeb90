"""The one kind of error that is the user's to fix: `InputError`.

A bad config value, a dataset that cannot be read as configured, weights that do not fit the
model, a plan that cannot be made: each is raised as a subclass of `InputError` where the value
is read, with one line naming the value and what would be valid. `ftlab.main` and the scripts
turn an `InputError` (and only that) into that line and exit code 2; anything else is a
programming error and keeps its traceback.

The typed errors live next to the code that raises them (`DatasetError` in
`ftlab.data.sources`, `PlanError` in `ftlab.plans.syntax`, ...); every one derives from
`InputError`. It is a `ValueError` too, so code that predates it and catches `ValueError`
around a single call still works.
"""

EXIT_BAD_INPUT = 2  # the command line's exit code for an InputError


class InputError(ValueError):
  """A problem with what the user gave (config, files, weights), found before compute."""


class ConfigError(InputError):
  """A config value that is out of range, of the wrong kind, or inconsistent with another."""
