"""The demo: pretrain on Fashion-MNIST classes 0-4, fine-tune on classes 5-9 from 50 labels each.

Run all of it with `bash scripts/pretrain_demo.sh`. One stage:

  python -m ftlab.main --config configs/demo.py:stage=pretrain --workdir W/source
  python -m ftlab.main --config configs/demo.py:stage=finetune,policy=linear_probe,source=W/source \
    --workdir W/linear_probe

`policy` is `scratch` (full training from a random init: the baseline), `linear_probe`,
`last_blocks` (the last conv block + head) or `full`. `runlocal` shrinks a stage to seconds.
"""

from configs import default

SOURCE_CLASSES = (0, 1, 2, 3, 4)  # T-shirt/top, Trouser, Pullover, Dress, Coat
TARGET_CLASSES = (5, 6, 7, 8, 9)  # Sandal, Shirt, Sneaker, Bag, Ankle boot
PLANS = ('scratch', 'linear_probe', 'last_blocks', 'full')


def get_config(arg: str | None = None):
  args = default.parse_arg(arg, stage='pretrain', policy='full', source='', runlocal=False)
  if args.stage not in ('pretrain', 'finetune'):
    raise ValueError(f'demo stage {args.stage!r} is not pretrain or finetune')
  if args.policy not in PLANS:
    raise ValueError(f'demo policy {args.policy!r} is not one of {PLANS}')
  config = default.get_config()
  config.model.name = 'vgg11_bn'
  config.model.width = 0.25  # 16..128 channels: a CPU-sized VGG
  config.model.head = 'mlp'
  config.dataset.name = 'fashion_mnist'
  config.dataset.image_size = 32
  config.dataset.preprocess = 'unit'
  config.dataset.augment = 'pad_crop'
  config.optimizer.name = 'sgd'
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 5e-4
  config.optimizer.schedule = 'cosine'
  config.eval_batch_size = 500
  if args.stage == 'pretrain':
    config.dataset.classes = SOURCE_CLASSES
    config.batch_size = 128
    config.num_train_steps = 500  # about 2 epochs of the 30,000 source images
    config.optimizer.learning_rate = 0.05
    config.optimizer.warmup_steps = 50
    config.log_every_steps = 50
    config.eval_every_steps = 250
    config.checkpoint_every_steps = 250
  else:
    config.dataset.classes = TARGET_CLASSES
    config.dataset.examples_per_class = 50  # the small label budget: 250 images
    config.batch_size = 50
    config.num_train_steps = 150  # 30 epochs of the 250 images
    config.optimizer.learning_rate = 0.02
    config.optimizer.warmup_steps = 10
    config.log_every_steps = 25
    config.eval_every_steps = 150
    config.checkpoint_every_steps = 150
    config.policy.name = 'full' if args.policy == 'scratch' else args.policy
    config.policy.k = 1
    if args.policy != 'scratch':
      config.init.checkpoint = args.source
      config.init.dont_load = ('fc/.*', 'predictions/.*')  # a new head for the new classes
  if args.runlocal:
    default.shrink(config)
    config.model.name = 'vgg11_bn'
    config.batch_size = 40 if args.stage == 'finetune' else 32
  return config
