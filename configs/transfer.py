"""Transfer a pretrained VGG (ImageNet-style 224 px input) to a tfds dataset under a policy.

  python -m ftlab.main --workdir DIR \
    --config configs/transfer.py:dataset=oxford_flowers102,policy=last_blocks,init=keras:vgg16

Arguments: `init` (required: named weights such as `keras:vgg16`, `torchvision:vgg16_bn` or
`timm:vgg16`, listed by `python -m ftlab.porting.weights list`, a directory written by
scripts/port_weights.py, a run's workdir, or `scratch` for a random start), `model` (the VGG the
weights are: vgg16 by default, `vgg16_bn` for torchvision:vgg16_bn), `dataset` (tfds name),
`policy` (see ftlab/plans/policies.py), `k` (for last_blocks / first_blocks), `runlocal` (a narrow
model from scratch on offline Fashion-MNIST, under a minute on a CPU: no pretrained VGG is that
narrow). The preprocessing is the weights' own (`auto`).
"""

from configs import default


def get_config(arg: str | None = None):
  args = default.parse_arg(
    arg,
    dataset='oxford_flowers102',
    policy='last_blocks',
    k=1,
    init='',
    model='vgg16',
    runlocal=False,
  )
  if not args.init and not args.runlocal:
    raise ValueError(
      'configs/transfer.py transfers pretrained weights: give init= named weights (e.g. '
      'init=keras:vgg16; `python -m ftlab.porting.weights list`), a ported directory, or '
      'init=scratch for a random start'
    )
  config = default.get_config()
  config.model.name = args.model
  config.model.head = 'imagenet'  # fc1/fc2 pretrained; predictions replaced (dont_load)
  config.dataset.name = args.dataset
  config.dataset.train_split = 'train'
  config.dataset.eval_split = 'test'
  config.dataset.image_size = 224
  # The weights' own convention (caffe for Keras, torch for torchvision and timm).
  config.dataset.preprocess = 'unit' if args.init == 'scratch' else 'auto'
  config.dataset.augment = 'resized_crop'
  config.policy.name = args.policy
  config.policy.k = args.k
  config.optimizer.name = 'sgd'
  config.optimizer.learning_rate = 0.01
  config.optimizer.warmup_steps = 100
  config.batch_size = 64
  config.num_train_steps = 5000
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500
  config.init.checkpoint = args.init
  if args.init != 'scratch':
    config.init.dont_load = ('predictions/.*',)  # the new task's head starts fresh
  if args.runlocal:
    config.dataset.name = 'fashion_mnist'
    config.dataset.preprocess = 'unit'
    config.dataset.augment = 'pad_crop'
    config.init.checkpoint = 'scratch'
    config.init.dont_load = ()
    default.shrink(config)
  return config
