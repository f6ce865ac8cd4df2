"""Every `ldm-lightning` subcommand's user errors (issue 25, items 5, 6, 8) are one paragraph naming the thing and
the fix, exit code 2, no traceback (`--debug` shows it), nothing lost: crafted / truncated / wrong-kind checkpoints
given to each tool, bad output paths, a non-image `.png`, NaN/inf floats, export into an existing export.
Table-driven, each case through the console script in a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
LDM = str(Path(sys.executable).parent / "ldm-lightning")
AE_TAG = "ldm_lightning.autoencoder.AutoencoderModule"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # what a crafted checkpoint does: name a callable the unpickler would run
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def files(tiny_ae, mnist_shards):
    """The inputs of the cases, in a folder every user may read (the read-only case runs as another user when
    the tests run as root, for whom permission bits do not apply)."""
    from PIL import Image

    from ldm_lightning.diffusion.module import DiffusionModule
    from ldm_lightning.encoders.mnist_classifier import ClassifierConfig, MNISTClassifier, save_mnist_classifier
    from ldm_lightning.export import export_checkpoint

    root = Path(tempfile.mkdtemp(prefix="ldm-user-errors-"))
    root.chmod(0o755)
    torch.manual_seed(0)
    # A class-conditional stage-2 checkpoint as `fit` writes it (state dict + the rebuild metadata), untrained:
    # these cases need its loading path, not its samples.
    m = DiffusionModule(tiny_ae, backbone="unet-tiny", conditioning={"kind": "class", "num_classes": 10})
    diffusion = root / "diffusion.ckpt"
    torch.save({"ldm_lightning": dict(m.meta), "state_dict": m.state_dict(), "global_step": 3}, diffusion)
    data = diffusion.read_bytes()
    (root / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    torch.save({"ldm_lightning": {"module": AE_TAG}, "state_dict": {}}, root / "autoencoder.ckpt")
    marker = root / "pwned"
    torch.save({"state_dict": {}, "x": _Evil(marker)}, root / "crafted.ckpt")
    export_checkpoint(str(diffusion), str(root / "export"), "safetensors")
    (root / "imgs").mkdir()
    for i in range(3):
        Image.new("L", (32, 32), 40 * i).save(root / "imgs" / f"{i}.png")
    (root / "imgs" / "3.png").write_text("not an image, named like one\n")
    save_mnist_classifier(MNISTClassifier(ClassifierConfig()), root / "clf.safetensors")  # untrained: enough here
    (root / "a-file").write_text("x")
    (root / "read-only").mkdir(mode=0o555)
    (root / "read-only").chmod(0o555)
    yield {"root": root, "marker": marker, "shards": mnist_shards["test"]}
    shutil.rmtree(root, ignore_errors=True)


def _cases(f: dict) -> dict:
    """id -> (argv, fragments of the one message line, a check that nothing was written/lost)."""
    r = f["root"]
    ckpt, crafted = str(r / "diffusion.ckpt"), str(r / "crafted.ckpt")
    refused = "refused: loading it could run code"
    evaluate = ["evaluate", "--extractor", "mnist", "--weights", str(r / "clf.safetensors"), "--metrics", "fid"]
    config_json = (r / "export" / "config.json").read_text()
    return {
        "sample-crafted": (["sample", "--checkpoint", crafted, "--classes", "0", "--out", str(r / "o1")],
                           [refused, "crafted.ckpt"], lambda: not any((r / "o1").glob("*.png"))),
        "export-crafted": (["export", "--checkpoint", crafted, "--out", str(r / "o2")], [refused, "crafted.ckpt"],
                           lambda: not (r / "o2").exists()),
        "evaluate-crafted": ([*evaluate, "--checkpoint", crafted, "--num", "4"], [refused, "crafted.ckpt"], None),
        "encode-crafted": (["data", "encode", "--autoencoder", crafted, "--shards", f["shards"], "--out",
                            str(r / "o4")], [refused, "crafted.ckpt"], lambda: not (r / "o4").exists()),
        "sample-truncated": (["sample", "--checkpoint", str(r / "truncated.ckpt"), "--out", str(r / "o5")],
                             ["truncated.ckpt", "truncated/corrupt", "re-copy it"], None),
        "sample-autoencoder-ckpt": (["sample", "--checkpoint", str(r / "autoencoder.ckpt"), "--out", str(r / "o6")],
                                    ["autoencoder (stage-1) checkpoint", "pass a diffusion (stage-2) .ckpt"], None),
        "sample-prompt-on-class-model": (["sample", "--checkpoint", ckpt, "--prompt", "a seven", "--out",
                                          str(r / "o7")], ["--prompt", "class-conditional", "--classes"],
                                         lambda: not any((r / "o7").glob("*.png"))),
        "sample-out-is-a-file": (["sample", "--checkpoint", ckpt, "--classes", "0", "--out", str(r / "a-file")],
                                 ["--out", "a-file", "is a file, not a folder"],
                                 lambda: (r / "a-file").read_text() == "x"),
        "sample-cfg-nan": (["sample", "--checkpoint", ckpt, "--classes", "0", "--cfg", "nan", "--out", str(r / "o9")],
                           ["--cfg", "must be a finite number, got 'nan'"], lambda: not (r / "o9").exists()),
        "export-into-an-export": (["export", "--checkpoint", ckpt, "--out", str(r / "export")],
                                  ["already holds files", "--overwrite", "export"],
                                  lambda: (r / "export" / "config.json").read_text() == config_json),
        "evaluate-non-image-png": ([*evaluate, "--images", str(r / "imgs"), "--save-stats", str(r / "o11.npz")],
                                   ["3.png", "not a readable image"], lambda: not (r / "o11.npz").exists()),
        "read-only-output": (["export", "--checkpoint", ckpt, "--out", str(r / "read-only" / "exp")],
                             ["read-only", ("permission denied", "read-only file system"), "choose a folder"],
                             lambda: not (r / "read-only" / "exp").exists()),
        "fit-nan-lr": (["fit", "-c", str(ROOT / "configs/autoencoder/tiny-mnist.yaml"), "-c",
                        str(ROOT / "configs/trainer/cpu-debug.yaml"), "--data.init_args.train_shards", f["shards"],
                        "--model.init_args.optim.lr", ".nan", "--trainer.default_root_dir", str(r / "o13")],
                       ["optim.lr must be a finite number, got nan"], lambda: not (r / "o13" / "checkpoints").exists()),
    }


CASE_IDS = ["sample-crafted", "export-crafted", "evaluate-crafted", "encode-crafted", "sample-truncated",
            "sample-autoencoder-ckpt", "sample-prompt-on-class-model", "sample-out-is-a-file", "sample-cfg-nan",
            "export-into-an-export", "evaluate-non-image-png", "read-only-output", "fit-nan-lr"]


def _as_other_user() -> list[str]:
    """A command prefix that drops root (whom permission bits do not stop), or [] when not root."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: a read-only folder cannot be made here")
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def run(argv: list[str], prefix: list[str] = (), **env_extra) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LDM_DEBUG"))}
    env.update(WANDB_MODE="offline", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **env_extra)
    return subprocess.run([*prefix, LDM, *argv], capture_output=True, text=True, env=env, timeout=300,
                          cwd=tempfile.gettempdir())


@pytest.mark.parametrize("case", CASE_IDS)
def test_user_error_is_one_paragraph_exit_2(case, files):
    argv, fragments, nothing_lost = _cases(files)[case]
    prefix = _as_other_user() if case == "read-only-output" else []
    r = run(argv, prefix, HOME=tempfile.gettempdir()) if prefix else run(argv)
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    message = [line for line in r.stderr.splitlines() if line.startswith("ldm-lightning")]
    assert len(message) == 1, r.stderr[-3000:]
    for fragment in fragments:  # a tuple: any one of them (the OS words it)
        assert any(f in message[0] for f in ((fragment,) if isinstance(fragment, str) else fragment)), message[0]
    assert nothing_lost is None or nothing_lost(), case
    assert not files["marker"].exists(), "a crafted checkpoint ran code"


def test_debug_shows_the_traceback(files):
    r = run(["export", "--checkpoint", str(files["root"] / "crafted.ckpt"), "--out", str(files["root"] / "d1"),
             "--debug"])
    assert r.returncode != 0 and "Traceback" in r.stderr and "refused: loading it could run code" in r.stderr
    assert not files["marker"].exists()


def test_export_overwrite_replaces_the_folder_whole(files):
    """`--overwrite` swaps a complete new export in; a kill while writing one leaves the old export loadable."""
    from ldm_lightning.diffusion.load import load_denoiser
    r = files["root"]
    out = r / "export"
    before = (out / "config.json").read_text()
    # killed while writing: the new files exist only in the sibling temp folder
    kill = subprocess.run([sys.executable, "-c", (
        "import os, signal, sys\n"
        "from ldm_lightning.output_paths import replace_dir\n"
        "def write(tmp):\n"
        "    (tmp / 'config.json').write_text('{\"half\": ')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        f"replace_dir({str(out)!r}, write, {{'config.json', 'denoiser.safetensors'}}, overwrite=True)\n")],
        capture_output=True, text=True, timeout=120)
    assert kill.returncode == -9, kill.stderr
    assert (out / "config.json").read_text() == before and list(r.glob(".export.tmp-*"))
    load_denoiser(out)
    p = run(["export", "--checkpoint", str(r / "diffusion.ckpt"), "--out", str(out), "--overwrite",
             "--weights", "live"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(x.name for x in out.iterdir()) == ["config.json", "denoiser.safetensors"]
    assert '"weights": "live"' in (out / "config.json").read_text()  # the new export, whole
    assert not list(r.glob(".export.*")), list(r.glob(".export.*"))  # the stale temp folder and the old one gone
    load_denoiser(out)
