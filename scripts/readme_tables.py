"""Rewrites the README's tables that the code generates: the policy table (the registry's).

  python scripts/readme_tables.py [--readme README.md]

`tests/test_design.py` fails when the README's table and `ftlab.plans.registry` disagree; this
script is how the README follows a method that was added or changed.
"""

import argparse
import sys

import readme_section

from ftlab.plans import registry

POLICY_TABLE = ('<!-- policy-table:start -->', '<!-- policy-table:end -->')


def policy_table() -> str:
  """The README's policy table: every registered method with its parameters, kind, summary
  and source (`ftlab.plans.registry.rows`)."""
  lines = ['| expression | kind | what it does | source |', '|---|---|---|---|']
  for signature, kind, summary, paper in registry.rows():
    lines.append(f'| `{signature}` | {kind} | {summary.replace("|", chr(92) + "|")} | {paper} |')
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--readme', default='README.md', help='the README to rewrite')
  args = parser.parse_args(argv)
  try:
    readme_section.replace(args.readme, POLICY_TABLE, policy_table())
  except (readme_section.ReadmeError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'{args.readme}: policy table of {len(registry.methods())} methods')
  return 0


if __name__ == '__main__':
  sys.exit(main())
