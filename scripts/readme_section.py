"""Rewrites one generated section of a README (between two HTML comment markers)."""

import re


def replace(path: str, markers: tuple[str, str], text: str) -> None:
  """Replaces what stands between `markers` in the file at `path` with `text`.

  Raises:
    ValueError: the file has no such section.
  """
  with open(path) as f:
    content = f.read()
  pattern = re.escape(markers[0]) + '.*?' + re.escape(markers[1])
  if not re.search(pattern, content, flags=re.S):
    raise ValueError(f'{path} has no {markers[0]} ... {markers[1]} section')
  content = re.sub(pattern, lambda _: f'{markers[0]}\n{text}\n{markers[1]}', content, flags=re.S)
  with open(path, 'w') as f:
    f.write(content)
