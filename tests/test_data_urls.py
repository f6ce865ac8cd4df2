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


def test_data_index_counts_http_shards_into_a_manifest_elsewhere(mnist_shards, http_root, tmp_path):
    """`data index URL-pattern --out DIR`: remote shards streamed once (keys only); the manifest's shards_dir is
    the base URL, so the loader reads the remote shards through it; no --out or a missing shard: one message."""
    import json
    import subprocess
    import sys

    urls = f"{http_root}/test/shard-{{000000..000003}}.tar"
    run = lambda *a: subprocess.run([sys.executable, "-m", "ldm_lightning", "data", "index", *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    r = run(urls, "--out", str(tmp_path / "idx"))
    assert r.returncode == 0, r.stderr[-2000:]
    man = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    ours = json.loads((Path(mnist_shards["test"]) / "manifest.json").read_text())
    assert man["shards_dir"] == f"{http_root}/test" and man["num_samples"] == ours["num_samples"] == 500
    assert [(s["name"], s["num_samples"]) for s in man["shards"]] == \
        [(s["name"], s["num_samples"]) for s in ours["shards"]]
    got = _stream(str(tmp_path / "idx" / "manifest.json"))
    assert [b["key"] for b in got] == [b["key"] for b in _stream(mnist_shards["test"])]
    for args, fragment in (((urls,), "add --out DIR"),
                           ((f"{http_root}/test/shard-00000{{0..9}}.tar", "--out", str(tmp_path / "x")),
                            "is not a readable tar")):
        r = run(*args)
        assert r.returncode == 2 and fragment in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_a_relative_shard_folder_resolves_to_its_own_files(mnist_shards, monkeypatch):
    """`val_shards: data/photos-val` (relative, with its manifest.json): shard paths are the folder's files, not
    the folder joined twice (a regression once broke the README flow that way)."""
    import os

    d = Path(mnist_shards["test"])
    monkeypatch.chdir(d.parent)
    shards = resolve_shards(d.name)
    assert shards and all(os.path.isfile(s.url) for s in shards), [s.url for s in shards][:2]
    assert sum(s.num_samples for s in shards) == 500
