"""scripts/launch_local.py: a stuck job ends with every process's Python stack, then stops."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A copy that waits forever, with the SIGUSR1 handler `ftlab.main` installs.
STUCK = (
  'import faulthandler, signal, time\n'
  'faulthandler.register(signal.SIGUSR1, all_threads=True)\n'
  'def waiting_in_a_collective():\n'
  '  time.sleep(600)\n'
  'waiting_in_a_collective()\n'
)


def test_a_timed_out_launch_prints_each_process_stack_then_stops_them():
  command = [
    sys.executable,
    'scripts/launch_local.py',
    '--num_processes=2',
    '--timeout=2',
    '--',
    sys.executable,
    '-c',
    STUCK,
  ]
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 124, result.stdout + result.stderr
  assert 'launch_local: timed out after 2 s' in result.stderr
  for i in range(2):
    # faulthandler's lines, each prefixed with the copy that printed it.
    assert f'[p{i}]   File "<string>", line 4 in waiting_in_a_collective' in result.stdout
