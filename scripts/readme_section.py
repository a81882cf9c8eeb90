"""Rewrites one generated section of a README (between two HTML comment markers).

Used by scripts/study.py, pretrain_demo.py, sweep.py, bench.py and readme_tables.py.
"""

import os
import re

from ftlab.errors import InputError


class ReadmeError(InputError):
  """A README without the section, in one line."""


def check(path: str, markers: tuple[str, str]) -> str:
  """The text of the file at `path`, which has a section between `markers`.

  Call it before long work that ends in `replace`, so a bad README fails first.

  Raises:
    OSError: the file cannot be read.
    ReadmeError: the file has no such section.
  """
  with open(path) as f:
    content = f.read()
  if not re.search(_pattern(markers), content, flags=re.S):
    raise ReadmeError(
      f'{path} has no {markers[0]} ... {markers[1]} section (the markers that enclose the '
      'generated text)'
    )
  return content


def replace(path: str, markers: tuple[str, str], text: str) -> None:
  """Replaces what stands between `markers` in the file at `path` with `text`; readers never
  see half a file.

  Raises:
    OSError: the file cannot be read or written.
    ReadmeError: the file has no such section.
  """
  content = check(path, markers)
  section = f'{markers[0]}\n{text}\n{markers[1]}'
  content = re.sub(_pattern(markers), lambda _: section, content, count=1, flags=re.S)
  partial = f'{path}.tmp{os.getpid()}'
  with open(partial, 'w') as f:
    f.write(content)
  os.replace(partial, path)


def _pattern(markers: tuple[str, str]) -> str:
  return re.escape(markers[0]) + '.*?' + re.escape(markers[1])
