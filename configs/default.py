"""Every config field, with its meaning and unit. Other configs start from this one.

Usage: `python -m ftlab.main --config configs/default.py[:runlocal] --workdir DIR
[--config.field=value ...]`. The argument after ':' is `key=value,key=value` (a bare key
means `key=True`); `runlocal` is the smoke run: a narrow VGG11-BN trained from scratch for 20
steps on 1,200 Fashion-MNIST images, about 10 s on a 2-core CPU, that visibly learns (eval
accuracy about 0.4 on 1,000 test images, where chance is 0.1): the cheapest check that a change
did not break training.
"""

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """`'policy=bitfit,runlocal'` -> ConfigDict(policy='bitfit', runlocal=True) over defaults.

  A value is converted to the type of its default (bool, int, float, str).
  """
  parsed = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    if key not in defaults:
      raise ValueError(f'unknown config argument {key!r}; valid: {", ".join(sorted(defaults))}')
    default = defaults[key]
    if not sep:
      parsed[key] = True
    elif isinstance(default, bool):
      parsed[key] = value.lower() in ('1', 'true', 'yes')
    else:
      parsed[key] = type(default)(value) if default is not None else value
  return parsed


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg, runlocal=False)
  config = ml_collections.ConfigDict()
  config.seed = 0  # one seed for init, data order and dropout

  config.model = ml_collections.ConfigDict()
  config.model.name = 'vgg16'  # vgg11 | vgg13 | vgg16 | vgg19, `_bn` suffix for BatchNorm
  config.model.head = 'mlp'  # imagenet | gap | mlp | none
  config.model.width = 1.0  # multiplier for conv channels and dense units
  config.model.dropout_rate = 0.5  # dropout in the imagenet and mlp heads
  config.model.adaptive_pool = 0  # pool block 5 to NxN before the head (torchvision: 7; 0 = off)
  # How convolutions run: auto (patches x matmul on CPU, where it is ~5x faster than XLA's
  # CPU convolutions; XLA's convolutions elsewhere) | conv | matmul. Same parameters; numbers
  # agree to float rounding (docs/performance.md).
  config.model.conv_lowering = 'auto'
  config.model.dtype = 'float32'  # activation dtype: float32 | bfloat16

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = 'fashion_mnist'  # tfds name; fashion_mnist is built from local files
  config.dataset.data_dir = ''  # tfds data_dir ('' = tfds default, ~/tensorflow_datasets)
  config.dataset.download = False  # let tfds download (never in tests)
  config.dataset.local_dir = ''  # fashion_mnist IDX files ('' = the Debian package's path)
  config.dataset.train_split = 'train'  # tfds split string, slicing allowed ('train[:90%]')
  config.dataset.eval_split = 'test'  # split evaluated every eval_every_steps
  # What the label is: '' (the dataset's own) | 'key:FEATURE' | 'bins:FEATURE:N' |
  # clevr_count | clevr_distance | kitti_distance (VTAB's structured tasks; ftlab/data/labels.py)
  config.dataset.label = ''
  config.dataset.classes = ()  # keep only these labels, relabelled 0.. in this order
  config.dataset.examples_per_class = 0  # few-shot budget per class in train (0 = all)
  config.dataset.image_size = 32  # pixels, square; images are resized to it
  config.dataset.preprocess = 'unit'  # caffe | torch | unit: the pretrained weights' convention
  config.dataset.augment = 'pad_crop'  # training only: none | flip | pad_crop | resized_crop
  # The minival split, which picks learning rates and the best step: the end of train_split
  # held out ('10%' or '5000'), or a split of its own ('validation[:200]', not overlapping train)
  config.dataset.minival = ''
  # More named splits evaluated beside eval_split, 'name=split, ...' ('v2=test[:50%]'): each
  # reported as <name>/accuracy and in summary.json's final_split_accuracy
  config.dataset.eval_splits = ''
  config.dataset.shuffle_buffer = 10_000  # examples (per data shard)
  # The training split cut into this many contiguous parts, each shuffled on its own and
  # filling batch_size / shards rows of every batch. A process reads only the shards its rows
  # come from (shards = the process count or a multiple: a 1/process_count share of the
  # records; 1: every process reads all). The data order depends on it, never on how many
  # processes run, so pick it once for a study (input_pipeline.BatchOrder).
  config.dataset.shards = 1

  config.policy = ml_collections.ConfigDict()
  # A plan expression (ftlab/plans/syntax.py) of the registered methods (`python -m ftlab.main
  # --help` and README's policy table list them): sets combined with | & - (union,
  # intersection, difference), modifiers after +, or a schedule or dynamic mask standing alone.
  # E.g. 'bitfit | last_blocks(1)', 'fisher(0.01) & blocks([4, 5])', 'lora(8) & blocks([4, 5])',
  # 'lp_ft(probe_steps=100) + l2_sp(alpha=0.01, beta=0.01)'. Bare names read the fields below.
  config.policy.name = 'full'
  config.policy.k = 1  # last_blocks / first_blocks: number of blocks
  config.policy.blocks = (1,)  # blocks: block numbers or names ('block1', 'fc')
  config.policy.train_head = True  # block policies and bitfit also train the new head
  config.policy.trainable = ()  # regex: rules for trainable paths (full match)
  config.policy.frozen = ()  # regex: rules for frozen paths (full match)
  config.policy.lr_multipliers = ()  # ((regex, multiplier), ...) for trainable paths

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = 'sgd'  # sgd | adam | adamw
  config.optimizer.learning_rate = 0.01  # peak learning rate
  config.optimizer.momentum = 0.9  # sgd momentum (0 = plain sgd)
  config.optimizer.nesterov = False  # sgd: Nesterov momentum
  config.optimizer.b1 = 0.9  # adam/adamw
  config.optimizer.b2 = 0.999  # adam/adamw
  config.optimizer.eps = 1e-8  # adam/adamw
  config.optimizer.weight_decay = 0.0  # sgd/adam: L2 on gradients; adamw: decoupled
  # Decay groups: ((regex, multiplier), ...), the first full match gives a trainable path its
  # multiplier of weight_decay, unmatched paths are not decayed; () = all x1. E.g. no decay
  # on biases and BatchNorm: (('.*/kernel', 1.0),).
  config.optimizer.wd_mults = ()
  config.optimizer.grad_clip_norm = 0.0  # global norm of the trainable gradient (0 = off)
  config.optimizer.warmup_steps = 0  # linear warmup, steps
  config.optimizer.schedule = 'cosine'  # cosine (to 0 at num_train_steps) | constant

  config.batch_size = 128  # global, over all devices and hosts
  config.eval_batch_size = 256  # global
  config.num_train_steps = 1000  # optimizer steps
  config.label_smoothing = 0.0
  # shard_map (jit over a 1-D device mesh, JAX's recommended way) | pmap (the older API; the
  # same numbers bit for bit)
  config.parallelism = 'shard_map'
  config.log_every_steps = 50  # train metrics to metrics.jsonl / TensorBoard
  config.eval_every_steps = 500  # also at the last step
  config.checkpoint_every_steps = 500  # also at the last step
  config.keep_checkpoints = 2  # newest checkpoints kept (>= 2: never lose the last good one)
  config.early_stopping_patience = 0  # stop after this many evals without improvement (0 = off)
  # XLA's FLOP count and per-device memory of each stage's compiled step, in summary (one more
  # compile per stage)
  config.record_step_flops = True
  # Gradient accumulation: each device's share of batch_size cut into this many
  # micro-batches, one update on their mean gradient (batch_size stays the global batch;
  # BatchNorm normalises per micro-batch). Memory of one micro-batch's activations.
  config.accum_steps = 1
  # Moving average of the weights that train (per step; e.g. 0.999, 0 = off), evaluated
  # beside them as <split>/ema_accuracy and checkpointed with the state.
  config.ema_decay = 0.0
  config.skip_nonfinite_updates = False  # skip (count, log) non-finite steps instead of stopping
  # Frozen-prefix activation cache (exact; needs dataset.augment='none' and a plan that trains
  # nothing, and draws no dropout, in the first blocks): the prefix runs once per example and
  # the steps run the rest. off | memory | disk (workdir/activation_cache/, reused on resume)
  # | auto (memory up to activation_cache_memory_mb MiB per split, else disk).
  config.activation_cache = 'off'
  config.activation_cache_memory_mb = 2048.0
  # Where disk caches go ('' = workdir/activation_cache/). Runs given one directory share
  # caches: a file is named by a hash of the prefix's layers, weights and data, so runs
  # reuse only outputs that are theirs bit for bit (e.g. every seed's eval split).
  config.activation_cache_dir = ''

  # Evaluators beside the eval splits' loss and accuracy (ftlab/evals/): each reads its own
  # section here, by its name, and is off until the section switches it on.
  config.evals = ml_collections.ConfigDict()
  # Closed-form few-shot probe at every eval (ftlab/evals/fewshot.py): ridge regression on the
  # current weights' features of a few examples per class, tested on test_split; metrics
  # fewshot/<k>shot_accuracy. Shows how a plan changes the representation, not the head.
  config.evals.fewshot = ml_collections.ConfigDict()
  config.evals.fewshot.shots = ()  # examples per class, e.g. (1, 5, 10, 25); () = off
  config.evals.fewshot.layer = 'pre_logits'  # pre_logits | block1..block5 | fc (pooled output)
  config.evals.fewshot.train_split = ''  # drawn from this split ('' = dataset.train_split)
  config.evals.fewshot.test_split = ''  # '' = dataset.eval_split
  config.evals.fewshot.l2_reg = 1024.0  # ridge coefficient (big_vision's few-shot default)
  # Forgetting (ftlab/evals/forgetting.py): the loaded weights' own head (e.g. ImageNet's) put back
  # on the current backbone; forgetting/agreement = share of these images whose top-1 is the
  # loaded model's (1.0 while the backbone is unchanged). A split of the dataset; '' = off.
  config.evals.forgetting = ml_collections.ConfigDict()
  config.evals.forgetting.split = ''
  # Shifted test sets (ftlab/evals/shift.py): the eval split under ImageNet-C-style corruptions
  # (Hendrycks & Dietterich, 2019) at every eval; metrics shift/<corruption>_<severity>/accuracy,
  # shift/clean_accuracy (the same examples uncorrupted) and shift/mean_accuracy.
  config.evals.shift = ml_collections.ConfigDict()
  config.evals.shift.enabled = False
  # () = all: gaussian_noise, gaussian_blur, contrast, jpeg, pixelate
  config.evals.shift.corruptions = ()
  config.evals.shift.severities = (1, 3, 5)  # of 1..5
  # Severity constants: imagenet_c (ImageNet-C's, 224 px) | cifar10_c (CIFAR-10-C's, 32 px) |
  # auto (cifar10_c up to 64 px inputs); the blur's std is scaled to the input size.
  config.evals.shift.table = 'auto'
  config.evals.shift.max_examples = 0  # evenly spaced examples of the split (0 = all)
  config.evals.shift.split = ''  # '' = the run's eval split (the classification eval's examples)

  config.init = ml_collections.ConfigDict()
  config.init.checkpoint = ''  # directory of a checkpoint (train run or ported weights)
  config.init.dont_load = ()  # regexes of parameter paths to keep freshly initialised
  config.init.allow_nonfinite = False  # load inf/NaN weights (refused: they train to NaN)

  config.multi_host = False  # call jax.distributed.initialize() (TPU pods, SLURM)

  if args.runlocal:
    shrink(config)
    # What learns in 20 steps from scratch (measured, eval accuracy on test[:10%]): a plain
    # VGG11 at this width stays at chance (0.09) under sgd or adam, with the mlp or gap head;
    # BatchNorm, a global-average-pool head and adam at a constant 1e-2 reach 0.40.
    config.model.name = 'vgg11_bn'
    config.model.head = 'gap'
    config.dataset.augment = 'flip'
    config.optimizer.name = 'adam'
    config.optimizer.learning_rate = 1e-2
    config.optimizer.schedule = 'constant'
  return config


def shrink(config: ml_collections.ConfigDict) -> None:
  """A run of under a minute on a 2-core CPU: narrow model, small data, few steps."""
  config.model.name = 'vgg11_bn' if config.model.name.endswith('_bn') else 'vgg11'
  config.model.width = 1 / 16
  config.dataset.image_size = 32
  config.dataset.train_split = 'train[:2%]'
  config.dataset.eval_split = 'test[:10%]'
  config.batch_size = 32
  config.eval_batch_size = 256
  config.num_train_steps = 20
  config.log_every_steps = 5
  config.eval_every_steps = 10
  config.checkpoint_every_steps = 10
