"""Shard specs: directory, glob, brace pattern, http:// from a local server, pipe: commands — same stream."""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import pytest
import torch

from ldm_lightning.data import ShardDataModule, resolve_shards


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def http_root(mnist_shards):
    root = Path(mnist_shards["test"]).parent
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _stream(spec, workers=2):
    dm = ShardDataModule(spec, batch_size=25, num_workers=workers, shuffle_buffer=50, seed=3)
    return [b for b in dm.train_dataloader()]


def test_every_spec_form_gives_the_same_stream(mnist_shards, http_root):
    d = mnist_shards["test"]
    ref = _stream(d)
    assert len(ref) == 20
    specs = [f"{d}/shard-*.tar", f"{d}/shard-{{000000..000003}}.tar", [f"{d}/shard-00000{i}.tar" for i in range(4)],
             f"{http_root}/test/", f"{http_root}/test/shard-{{000000..000003}}.tar",
             f"pipe:cat {d}/shard-{{000000..000003}}.tar"]
    for spec in specs:
        got = _stream(spec)
        assert [b["key"] for b in got] == [b["key"] for b in ref], spec
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(got, ref)), spec


def test_http_validation_loader(mnist_shards, http_root):
    dm = ShardDataModule(f"{http_root}/train", f"{http_root}/test", batch_size=32, val_samples=64)
    assert [k for b in dm.val_dataloader() for k in b["key"]] == [f"mnist-test-{i:06d}" for i in range(64)]


def test_missing_manifest_and_files_are_clear(tmp_path, http_root):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        resolve_shards(f"{http_root}/nothing-here/")
    with pytest.raises(FileNotFoundError, match="no such file"):
        resolve_shards(str(tmp_path / "shard-{000000..000001}.tar"))
