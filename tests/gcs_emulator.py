"""A GCS emulator on loopback, in memory, for the remote-workdir tests.

`python tests/gcs_emulator.py PORT BUCKET` serves `gcp-storage-emulator` with one addition:
the `objects.moveTo` route, as a copy and a delete. gcsfs renames through moveTo first; the
emulator answers it 501, and gcsfs then retries six times with backoff (about 30 s per rename)
before it copies and deletes by itself.

`environment(url)` is what a process needs to reach it: gcsfs and google-cloud-storage read
`STORAGE_EMULATOR_HOST`, TensorStore (Orbax's array writer) `TENSORSTORE_GCS_HTTP_URL`; the
rest skip credential lookups, and `EPATH_USE_TF=0` sends epath's gs:// to gcsfs, since
tf.io.gfile's GCS client is fixed to googleapis.com.
"""

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request


def environment(url: str) -> dict[str, str]:
  return {
    'STORAGE_EMULATOR_HOST': url,
    'TENSORSTORE_GCS_HTTP_URL': url,
    'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',
    'EPATH_USE_TF': '0',
    # A plain GCSFileSystem: no bucket-type lookup through the storage control API.
    'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
    'FSSPEC_GCS_TOKEN': 'anon',
    'NO_GCE_CHECK': 'true',
  }


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start(bucket: str, cwd: str, timeout: float = 60) -> tuple[subprocess.Popen, str]:
  """The emulator process serving `bucket`, and its URL, once it answers."""
  port = free_port()
  proc = subprocess.Popen(
    [sys.executable, __file__, str(port), bucket],
    cwd=cwd,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  url = f'http://127.0.0.1:{port}'
  deadline = time.time() + timeout
  while True:
    try:
      urllib.request.urlopen(url, timeout=1).read()
      return proc, url
    except OSError:
      if proc.poll() is not None or time.time() > deadline:
        proc.kill()
        raise RuntimeError(f'the GCS emulator did not start (exit code {proc.poll()})')
      time.sleep(0.1)


def objects(url: str, bucket: str, prefix: str) -> list[str]:
  """The names of the bucket's objects under `prefix`, from the emulator's JSON API."""
  names, token = [], None
  while True:
    query = {'prefix': prefix, **({'pageToken': token} if token else {})}
    listing = f'{url}/storage/v1/b/{bucket}/o?{urllib.parse.urlencode(query)}'
    page = json.loads(urllib.request.urlopen(listing, timeout=30).read())
    names += [item['name'] for item in page.get('items', [])]
    token = page.get('nextPageToken')
    if not token:
      return sorted(names)


def read(url: str, bucket: str, name: str) -> bytes:
  """An object's bytes, from the emulator's JSON API."""
  quoted = urllib.parse.quote(name, safe='')
  return urllib.request.urlopen(f'{url}/storage/v1/b/{bucket}/o/{quoted}?alt=media').read()


def write(url: str, bucket: str, name: str, data: bytes) -> None:
  """Uploads `data` as the object `name` (replacing it)."""
  query = urllib.parse.urlencode({'uploadType': 'media', 'name': name})
  request = urllib.request.Request(
    f'{url}/upload/storage/v1/b/{bucket}/o?{query}', data=data, method='POST'
  )
  urllib.request.urlopen(request).read()


def serve(port: int, bucket: str) -> None:
  import logging
  from http import HTTPStatus

  from gcp_storage_emulator import server
  from gcp_storage_emulator.exceptions import NotFound
  from gcp_storage_emulator.handlers import objects as handlers

  logging.getLogger().setLevel(logging.CRITICAL)
  close = server.Response.close

  def quiet_close(self):
    # gcsfs races two requests in isdir() and drops the loser: a broken pipe, harmless.
    try:
      close(self)
    except (BrokenPipeError, ConnectionResetError):
      pass

  def move(request, response, storage, *args, **kwargs):
    p = request.params
    try:
      moved = handlers._copy(
        request.base_url,
        storage,
        p['bucket_name'],
        p['object_id'],
        p['bucket_name'],
        p['dest_object_id'],
      )
      handlers._delete(storage, p['bucket_name'], p['object_id'])
      response.json(moved)
    except NotFound:
      response.status = HTTPStatus.NOT_FOUND

  download = handlers.download

  def download_with_generation(request, response, storage, *args, **kwargs):
    # TensorStore (Orbax's OCDBT manifests) reads an object's generation from this header,
    # as GCS sends it; the emulator leaves it out ("Malformed StorageGeneration").
    download(request, response, storage, *args, **kwargs)
    if response.status == HTTPStatus.OK or response.status == HTTPStatus.PARTIAL_CONTENT:
      obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
      response['x-goog-generation'] = obj['generation']
      response['x-goog-metageneration'] = obj['metageneration']

  handlers.download = download_with_generation  # `get` with alt=media calls it by name
  server.Response.close = quiet_close
  route = (
    r'^/storage/v1/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)'
    r'/moveTo/o/(?P<dest_object_id>.*[^/]+)$'
  )
  routes = [
    (regex, {m: download_with_generation if f is download else f for m, f in methods.items()})
    for regex, methods in server.HANDLERS
  ]
  server.HANDLERS = ((route, {'POST': move}), *routes)
  server.create_server('127.0.0.1', port, in_memory=True, default_bucket=bucket).run()


if __name__ == '__main__':
  serve(int(sys.argv[1]), sys.argv[2])
