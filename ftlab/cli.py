"""The command line's `--config` flags, with one-line errors for what a user mistyped.

`ftlab.main` and the scripts read a config file with ml_collections' `config_flags`
(`--config configs/X.py[:args]`, overrides `--config.dataset.eval_split=test`). Before absl
parses them, `check_overrides` reads the config file alone and checks that every override
names a field of it: a misspelt field, or one given at the wrong level, is one line naming
the field and the one that exists (`--config.eval_split` -> `dataset.eval_split`), where
ml_collections would raise a KeyError wrapped in an AttributeError. `parse` then runs absl's
parser and turns its errors (a value of the wrong type, a config file that raised) into one
line too; nothing else is caught.
"""

from __future__ import annotations

import difflib
from typing import Any, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from ftlab.errors import ConfigError


def flag_error_line(error: Exception) -> str:
  """A bad `--config` flag's error in one line: a config file that raised comes wrapped in
  its traceback, whose last line is the error."""
  lines = [line for line in str(error).strip().splitlines() if line.strip()]
  # ml_collections wraps an exception raised by the config file in the formatted traceback;
  # its last line is the exception itself, the one line a user needs.
  if any(line.startswith('Traceback') for line in lines):
    return lines[-1]
  # absl's messages wrap over several lines; one line reads better after `error:`.
  return ' '.join(' '.join(lines).split())


def _fields(config: Any, prefix: str = '') -> list[str]:
  """Every dotted field of a ConfigDict (sections and leaves)."""
  found = []
  for key, value in config.items():
    found.append(prefix + key)
    if isinstance(value, ml_collections.ConfigDict):
      found += _fields(value, f'{prefix}{key}.')
  return found


def _override_names(argv: Sequence[str], name: str) -> list[str]:
  """The dotted fields that `--<name>.a.b=v` (or `--no<name>.a.b`) arguments override."""
  found = []
  for arg in argv:
    for prefix in (f'--{name}.', f'--no{name}.'):
      if arg.startswith(prefix):
        # `--noconfig.a.b` is absl's spelling of `--config.a.b=False` for a boolean field.
        found.append(arg[len(prefix) :].split('=', 1)[0])
  return found


def _config_argument(argv: Sequence[str], name: str) -> list[str]:
  """The `--<name>=FILE` (or `--<name> FILE`) arguments of `argv`."""
  for i, arg in enumerate(argv):
    if arg.startswith(f'--{name}='):
      return [arg]
    if arg == f'--{name}' and i + 1 < len(argv):
      return [arg, argv[i + 1]]
  return []


def check_overrides(argv: Sequence[str], name: str = 'config') -> None:
  """Checks that every `--config.FIELD=...` names a field of the config file's config.

  Args:
    argv: the command line (program name first).
    name: the config flag's name.

  Raises:
    ConfigError: naming the first override that names no field, and the field meant (a close
      spelling at its level, or a field of that name elsewhere in the config).
  """
  overrides, given = _override_names(argv[1:], name), _config_argument(argv[1:], name)
  # Nothing to check without overrides; without a config argument absl itself reports the
  # missing required flag.
  if not overrides or not given:
    return
  # A throwaway FlagValues with only the config argument: the real FLAGS must not be parsed
  # twice, and an unknown override would make this parse fail before it could be named.
  probe, probe_argv = flags.FlagValues(), [argv[0], *given]
  # sys_argv: config_flags applies the overrides it finds there; the probe reads none.
  config_flags.DEFINE_config_file(name, None, 'the config file', probe, sys_argv=probe_argv)
  try:
    probe(probe_argv)
  except flags.Error:
    return  # the config file itself fails: absl's parse says how (see `parse`)
  config, fields = probe[name].value, None
  for dotted in overrides:
    node, keys = config, dotted.split('.')
    for depth, key in enumerate(keys):
      if isinstance(node, ml_collections.ConfigDict) and key in node:
        node = node[key]
        continue
      # Listed once, on the first miss: a correct command line never walks the whole config.
      fields = fields or _fields(config)
      level = '.'.join(keys[:depth])
      siblings = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      # The same name elsewhere (a field given at the wrong level) first, then a close
      # spelling at this level.
      meant = [f for f in fields if f.split('.')[-1] == key]
      close = difflib.get_close_matches(key, siblings, n=1)
      meant += [f'{level}.{close[0]}' if level else close[0]] if close else []
      where = f' in {level}' if level else ''
      hint = f'; did you mean --{name}.{meant[0]}?' if meant else ''
      raise ConfigError(f'--{name}.{dotted}: the config has no field {key!r}{where}{hint}')


def parse(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """absl's parser for a command line with a config flag; bad input is one `ConfigError`.

  Raises:
    ConfigError: an override that names no field (`check_overrides`), a value that does not
      parse, a config file or argument that raises, or another bad flag.
  """
  # Before absl's parse: absl would report a misspelt field as a KeyError inside an
  # AttributeError, without saying which field was meant.
  check_overrides(argv)
  try:
    return flag_values(list(argv))
  except flags.Error as e:
    what = 'bad --config' if str(e).startswith('flag --config') else 'bad flags'
    raise ConfigError(f'{what}: {flag_error_line(e)}') from None
