"""Mistakes a user can fix (config, files, data): reported as one line, never as a traceback."""


class UserError(Exception):
  """Base of every error whose message alone tells the user what to change."""
  exit_code = 1


class ConfigError(UserError, ValueError):
  """A config value that cannot work (unknown key or task, indivisible batch, other run in workdir)."""
