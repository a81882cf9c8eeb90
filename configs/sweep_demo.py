"""A mask ablation on the demo's transfer task: a grid for scripts/sweep.py, not a run config.

  python scripts/sweep.py --workdir workdirs/sweep_demo --grid configs/sweep_demo.py
  python scripts/sweep.py --workdir /tmp/sweep_smoke --grid configs/sweep_demo.py:runlocal

Pretrains the demo's source model (Fashion-MNIST classes 0-4) once into WORKDIR/source, then
fine-tunes it on classes 5-9 from 50 labels per class under each plan with two seeds, and
evaluates on the full target test split. Flags on the sweep's command line replace a field
(`--seeds 0 1 2`, `--plans ...`); `runlocal` shrinks every run to seconds.
"""

from configs import default


def get_sweep(arg: str | None = None) -> dict:
  args = default.parse_arg(arg, runlocal=False)
  runlocal = ',runlocal' if args.runlocal else ''
  steps = 20 if args.runlocal else 150  # the demo's fine-tuning steps (default.shrink: 20)
  return dict(
    config='configs/demo.py:stage=finetune' + runlocal,  # every run's base config
    pretrain='configs/demo.py:stage=pretrain' + runlocal,  # trained once, loaded by every run
    plans=[
      'linear_probe',  # the new head only
      'bitfit',  # every bias + head
      'last_blocks(1)',  # the last conv block + head
      'bitfit | last_blocks(1)',
      'random_sparse(density=0.05, seed=0)',  # 5% of the backbone's entries, at random
      "magnitude(density=0.05, which='largest')",
      'fisher(density=0.05, num_batches=5)',  # the 5% with the largest squared gradients
      'full',
      f'lp_ft(probe_steps={steps // 3})',  # linear probe, then everything
      'full + l2_sp(alpha=0.01, beta=0.0)',  # pulled toward the pretrained weights
    ],
    seeds=[0, 1],
    lrs=[],  # [] = the base config's (0.02)
    overrides=[],  # --config.field=value flags for every fine-tuning run
    baseline='full',  # the report pairs every plan with it, seed by seed
  )
