"""`DiffusionModule`: stage 2, a denoiser trained in a frozen autoencoder's latent space (LDM, Rombach et al. 2022).

Batches (docs/contracts.md) carry either `image` (B, C, H, W) in [-1, 1] — encoded here under no_grad by the
frozen autoencoder, in fp32 or bf16 (never fp16: VAE encoders overflow it) — or `moments` (B, 2c, h, w)
from latent shards written by `ldm-lightning data encode`. Both give z ~ q(z|x) drawn with the same
`step_generator("posterior")`, normalised as (z - shift) * scale, so the two paths train identically.

The autoencoder and the text encoder are held OUTSIDE the module tree: never trained, never EMA'd, never
in a checkpoint (the checkpoint records the autoencoder's path and content hash instead), never sharded.
Validation: loss per timestep bin with a fixed generator, and a sample grid from the EMA weights with a
fixed seed (the logger's `log_image` when it has one, else `<log_dir>/samples/step_XXXXXXX.png`).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from ldm_lightning.finite import check_finite
from ldm_lightning.hparams import init_hparams, plain
from ldm_lightning.images import image_grid, model_range
from ldm_lightning.nn.lora import LoRAConfig, apply_lora, is_adapter_key
from ldm_lightning.nn.posthoc_ema import PosthocEMAConfig
from ldm_lightning.training.base import EMAConfig, OptimConfig, TrainingModule
from ldm_lightning.training.data_settings import datamodule_settings, preprocess_settings
from ldm_lightning.training.logging_steps import is_logging_step
from ldm_lightning.training.nonfinite_guard import GuardConfig
from ldm_lightning.training.speed import (SpeedConfig, SpeedLevers, as_speed, compile_network, images_channels_last,
                                          to_channels_last)

from .backbone_overrides import BackboneOverrides, backbone_overrides
from .concat import build_c_concat, concat_channels, training_c_concat
from .conditioning import Conditioner, ConditioningConfig
from .denoiser import Denoiser
from .layout import parse_layout_text
from .load import CHECKPOINT_TAG
from .loss import DiffusionObjective, ObjectiveConfig, loss_by_bin
from .presets import PRESETS, TRANSFORMER_FAMILIES, UNET_FAMILIES, build_backbone, latent_grid_step
from .repa import BlockTap, REPAConfig, REPAError, REPAProjector, load_repa_encoder
from .samplers import SAMPLERS
from .sampling import SamplingConfig, module_device, sample_images
from .schedule_config import ScheduleConfig, schedule_settings
from .schedules import build_schedule

EncodeDtype = Literal["fp32", "bf16"]  # fp16 is left out on purpose: it overflows in VAE encoders
ENCODE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _as(cls, value):
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    return cls(**dict(value))


class DiffusionModule(SpeedLevers, TrainingModule):
    def __init__(self, autoencoder: str, image_size: int | None = None, backbone: str = "unet-tiny",
                 backbone_config: BackboneOverrides = BackboneOverrides(),
                 schedule: ScheduleConfig = ScheduleConfig(), objective: ObjectiveConfig | dict | None = None,
                 conditioning: ConditioningConfig | dict | None = None, encode_dtype: EncodeDtype = "fp32",
                 sample_posterior: bool = True, check_latent_hash: bool = True, loss_bins: int = 10,
                 val_sampler: str = "ddim", val_steps: int = 25, val_cfg: float = 3.0, val_num: int = 16,
                 val_seed: int = 0, val_prompts: list[str] | None = None, val_prompts_file: str | None = None,
                 optim: OptimConfig | dict | None = None, ema: EMAConfig | dict | None = None,
                 guard: GuardConfig | dict | None = None, seed: int = 0, compile: bool = False,
                 speed: SpeedConfig | dict | None = None, repa: REPAConfig | dict | None = None,
                 posthoc_ema: PosthocEMAConfig | dict | None = None, init_from: str | None = None,
                 lora: LoRAConfig | dict | None = None):
        """
        Args:
            autoencoder: Path of the frozen stage-1 autoencoder (.ckpt, export folder, diffusers folder);
                encodes image batches, decodes validation samples, and its content hash must match the one
                in a latent-shard manifest.
            image_size: Training image side in pixels (data.image_size; the latent cache's key for latent shards).
                The latent side is image_size // the autoencoder's downsampling factor: the DiT's input_size, the
                checkpoint's latent_shape, `ldm-lightning sample`'s default size. null (default): the
                autoencoder's `resolution` (a preset's size, which otherwise only places its attention), else the
                DiT preset's input_size; set it to train at another size than the autoencoder's preset.
            backbone: A preset of `diffusion/presets.py` ('unet-tiny', 'dit-tiny', 'DiT-B/4', ...), or 'unet' /
                'dit' for the bare UNetConfig / DiTConfig defaults; 'sd_unet' / 'sd_unet-2': Stable Diffusion's own
                UNet layout (SDUNetConfig; what an SD / diffusers UNet2DConditionModel import needs).
            backbone_config: UNetConfig / DiTConfig / DDTConfig / SDUNetConfig fields overriding the preset
                (BackboneOverrides: each optional, unset = the preset's). in_channels, num_classes, context_dim and
                (DiT) input_size are filled from the autoencoder, image_size and conditioning.
            schedule: ScheduleConfig: kind 'vp' | 'flow' and that schedule's VPSchedule / FlowSchedule fields;
                default VP scaled_linear. A plain mapping (YAML, Python) works as well.
            objective: ObjectiveConfig (prediction eps/v/x0/flow, loss_space — JiT: x0 with 'v' —,
                timestep sampling, min-SNR weighting).
            conditioning: ConditioningConfig ('none' | 'class' with num_classes | 'text'; drop_prob for CFG).
            encode_dtype: 'fp32' or 'bf16' precision of on-the-fly encoding (fp16 is refused: it overflows).
            sample_posterior: Train on z ~ q(z|x) (LDM); False trains on the posterior mean.
            check_latent_hash: Refuse latent shards whose manifest names another autoencoder hash, or another
                image_size / resize_mode / random_flip / bucketing than the data config (the cache's key).
            loss_bins: Number of timestep bins of the logged `train/loss_bin_k` (0 = off).
            val_sampler: Sampler of validation samples (one of samplers.SAMPLERS).
            val_steps: Sampler steps of validation samples.
            val_cfg: Classifier-free guidance scale (SamplingConfig.guidance_scale) of validation samples (1 =
                conditional only).
            val_num: Number of validation samples in the grid (0 = no sampling).
            val_seed: Seed of the validation noise (fixed: the grids of successive validations compare).
            val_prompts: Text kind: a fixed prompt gallery. Each prompt is sampled with the same
                max(1, val_num // len(val_prompts)) noises (grid rows = prompts, columns = seeds), from the EMA and
                from the raw weights: `val/samples` and `val/samples_raw` (PNG: samples/, samples_raw/). None = the
                first validation batch's captions, EMA only. With aspect buckets (data.bucketing) each prompt is
                sampled at every bucket's size (diffusion/prompt_gallery.py; the gallery costs x the bucket count).
            val_prompts_file: The gallery's prompts from a text file instead, one a line (blank lines skipped);
                read when the model is built, so the prompts are saved with the hyper-parameters.
            optim / ema / guard / seed: See training/base.py.
            posthoc_ema: PosthocEMAConfig (nn/posthoc_ema.py): EDM2 power-function EMA profiles and their
                snapshots for `ldm-lightning ema-reconstruct`; null (default) = off. Kept beside `ema`.
            compile: `torch.compile` the trained (live) backbone in place; parameter names do not change, so
                checkpoints load with or without it. Activation checkpointing is the backbone's own flag
                (`backbone_config: {grad_checkpointing: true}`).
            speed: GPU throughput levers (training/speed.py): channels_last (UNet backbone, frozen autoencoder
                and image inputs in NHWC), tf32, compile_mode ('model' | 'blocks': what `compile` compiles).
            repa: REPAConfig (diffusion/repa.py): representation alignment of the tokens after block `block`
                to a frozen encoder's patch features (`encoder`: a local DINOv2 folder or
                'mnist-classifier:PATH'), weight `weight`; logged as `train/repa_loss`. Off by default.
                Needs image batches (the encoder sees the clean pixels) and a DiT / DDT backbone.
            init_from: published or earlier weights to start from (diffusion/interop.py: a facebookresearch/DiT
                .pt, a diffusers DiT or SD UNet folder, a denoiser export or .ckpt; `ldm-lightning import` converts
                once).
                Loaded into the live and EMA weights at construction (a resume then overwrites them with its
                checkpoint's); the optimizer starts fresh. Its architecture, schedule and prediction must agree
                with this config (one message naming the field otherwise).
            lora: LoRAConfig (nn/lora.py; rank, alpha, targets): train low-rank adapters only, the base frozen;
                needs init_from (the base weights come from there at load: checkpoints hold no frozen tensors).
        """
        arguments = dict(locals())  # before any other local: what init_hparams records
        super().__init__(_as(OptimConfig, optim), _as(EMAConfig, ema), _as(GuardConfig, guard), seed,
                         None if posthoc_ema is None else _as(PosthocEMAConfig, posthoc_ema))
        self.speed = as_speed(speed)
        if backbone not in PRESETS:
            raise ValueError(f"model.backbone must be one of {sorted(PRESETS)}; got {backbone!r}")
        if encode_dtype not in ENCODE_DTYPES:
            raise ValueError(f"model.encode_dtype must be one of {tuple(ENCODE_DTYPES)} (fp16 overflows in VAE "
                             f"encoders); got {encode_dtype!r}")
        if val_sampler not in SAMPLERS:
            raise ValueError(f"model.val_sampler must be one of {sorted(SAMPLERS)}; got {val_sampler!r}")
        for name, v, lo in (("loss_bins", loss_bins, 0), ("val_steps", val_steps, 1), ("val_num", val_num, 0)):
            if v < lo:
                raise ValueError(f"model.{name} must be >= {lo}; got {v}")
        check_finite("model.val_cfg", val_cfg)
        sched = schedule_settings(schedule)
        obj_cfg = _as(ObjectiveConfig, objective)
        repa_cfg = _as(REPAConfig, repa)
        cond_cfg = _as(ConditioningConfig, conditioning)
        self.autoencoder_path = str(autoencoder)
        from ldm_lightning.autoencoder.hashing import autoencoder_hash
        from ldm_lightning.autoencoder.load import load_autoencoder
        ae = load_autoencoder(autoencoder).eval().requires_grad_(False)
        self._ae = [ae]  # a list: not a submodule (not trained / saved / EMA'd / sharded)
        self.autoencoder_hash = autoencoder_hash(ae)

        self.conditioner = Conditioner(cond_cfg)
        family = PRESETS[backbone][0]
        backbone_config = backbone_overrides(backbone_config)
        cfg = dict(backbone_config)
        cfg["in_channels"] = ae.latent_channels
        if family in UNET_FAMILIES:
            cfg["out_channels"] = ae.latent_channels
        if cond_cfg.kind == "class":
            cfg["num_classes"] = cond_cfg.num_classes
        if cond_cfg.kind in ("text", "layout"):
            cfg["context_dim"] = self.conditioner.context_dim
            if self.conditioner.pooled_dim is not None:  # text encoders with use_pooled: the vector input
                cfg["pooled_dim"] = self.conditioner.pooled_dim
            if self.conditioner.tau_fields() is not None:  # τθ inside the backbone: trained, saved, EMA'd with it
                cfg["text_transformer"] = self.conditioner.tau_fields()
        if cond_cfg.concat != "none":  # c_concat: low-res image, masked image's latent + mask, class map
            cfg["concat_channels"] = concat_channels(cond_cfg.concat, int(ae.config.in_channels), ae.latent_channels,
                                                     cond_cfg.map_classes)
        latent_side = self.latent_side(ae, image_size, family, {**PRESETS[backbone][1], **cfg})
        if family in TRANSFORMER_FAMILIES:
            if image_size is not None and cfg.get("input_size", latent_side) != latent_side:
                raise ValueError(f"model.backbone_config.input_size={cfg['input_size']} but model.image_size="
                                 f"{image_size} makes {latent_side}-token-wide latents: drop input_size (it follows "
                                 "image_size) or make them agree")
            if image_size is not None or ("input_size" not in cfg and "input_size" not in PRESETS[backbone][1]):
                cfg["input_size"] = latent_side
        pretrained = None
        if init_from:  # read first: fields that change no tensor shape (diffusers port numerics) come from it
            from .finetune import INHERITED_FIELDS, read_init_from
            pretrained = read_init_from(init_from, family, {**PRESETS[backbone][1], **cfg})
            for k in INHERITED_FIELDS:
                if k in pretrained.backbone:
                    cfg.setdefault(k, pretrained.backbone[k])
        net = build_backbone(backbone, **cfg)
        bb_cfg = net.cfg
        self.latent_size = int(bb_cfg.input_size) if family in TRANSFORMER_FAMILIES else latent_side
        self.image_size = image_size
        if sched["kind"] == "flow" and sched.get("shift_base_dim") and not sched.get("latent_dim"):
            sched["latent_dim"] = ae.latent_channels * self.latent_size ** 2  # RAE's shift: m = C*H*W (schedules.py)
        self.meta = {"module": CHECKPOINT_TAG, "backbone_family": family, "backbone": dataclasses.asdict(bb_cfg),
                     "schedule": sched, "objective": plain(obj_cfg), "conditioning": plain(cond_cfg),
                     "latent_shape": [ae.latent_channels, self.latent_size, self.latent_size],
                     "autoencoder": {"path": self.autoencoder_path, "hash": self.autoencoder_hash}}
        self.repa_cfg, self.repa = repa_cfg, None
        if repa_cfg.enabled:  # the projector is trained (a submodule); the encoder is frozen and kept outside
            if family not in TRANSFORMER_FAMILIES or not 1 <= repa_cfg.block <= len(net.blocks):
                raise REPAError(f"repa.block={repa_cfg.block}: backbone {backbone!r} has "
                                + (f"{len(net.blocks)} (encoder) blocks; give 1..{len(net.blocks)}"
                                   if family in TRANSFORMER_FAMILIES else "no transformer blocks (use a DiT / DDT)"))
            enc = load_repa_encoder(repa_cfg.encoder, repa_cfg.encoder_resolution)
            self._repa_encoder = [enc]
            self.repa = REPAProjector(bb_cfg.hidden_size, enc.feature_dim, repa_cfg.projector_dim)
        schedule_obj = build_schedule(**sched)
        self.denoiser = Denoiser(net, schedule_obj, obj_cfg.prediction, obj_cfg.clamp)
        self.init_from, self.lora_cfg = init_from, _as(LoRAConfig, lora)
        if pretrained is not None:  # before the EMA copy: the EMA starts from the imported weights
            from .finetune import load_pretrained
            load_pretrained(self.denoiser, pretrained, sched, obj_cfg.prediction, init_from)
            self.meta["init_from"] = str(init_from)
        if self.lora_cfg.enabled:
            if pretrained is None:
                raise ValueError("model.lora needs model.init_from: the weights the adapters fine-tune (and that a "
                                 "LoRA checkpoint, holding the adapters only, is loaded on top of)")
            apply_lora(self.denoiser.backbone, self.lora_cfg)
            self.meta["lora"] = plain(self.lora_cfg)
        self.objective = DiffusionObjective(obj_cfg, schedule_obj)
        self.encode_dtype, self.sample_posterior = encode_dtype, sample_posterior
        self.check_latent_hash, self.loss_bins = check_latent_hash, loss_bins
        self.val_num, self.val_seed = val_num, val_seed
        # val_cfg keeps its name (users' YAML, and the hyper-parameters a resume compares): it is the guidance_scale
        self.val_sampling = SamplingConfig(val_sampler, val_steps, val_cfg, val_seed)
        if val_prompts_file is not None:
            if val_prompts is not None:
                raise ValueError("model.val_prompts and model.val_prompts_file both give the gallery's prompts: "
                                 "keep one")
            from .prompt_gallery import read_prompts_file
            val_prompts = read_prompts_file(val_prompts_file, "model.val_prompts_file")
        if val_prompts is not None and (cond_cfg.kind != "text" or not val_prompts):
            raise ValueError("model.val_prompts is a gallery of text prompts: give a non-empty list, for a "
                             "text-conditional model (conditioning.kind: text)")
        self.val_prompts = None if val_prompts is None else [str(p) for p in val_prompts]
        # Every argument, plain (torch.load(weights_only=True)); image_size only when set: Lightning and
        # check_hparams_agree compare the keys model and data share, and None (follow the autoencoder) would
        # disagree with data.image_size.
        resolved = {
            "autoencoder": self.autoencoder_path, "backbone_config": backbone_config or None, "schedule": sched,
            "objective": obj_cfg, "conditioning": cond_cfg, "val_prompts": self.val_prompts, "optim": self.optim_cfg,
            "ema": self.ema_cfg, "guard": self.guard_cfg, "posthoc_ema": self.posthoc_ema_cfg, "lora": self.lora_cfg,
            "speed": self.speed, "repa": repa_cfg}
        self.save_hyperparameters(init_hparams(DiffusionModule.__init__, arguments, resolved,
                                               omit_none=("image_size",)))
        if self.speed.channels_last:  # before the EMA copy, so both are NHWC
            to_channels_last(self.denoiser.backbone, ae)
        self.setup_ema(self.denoiser)
        # after the EMA copy: EMA weights sample eagerly
        compile_network(self.denoiser.backbone, compile, self.speed.compile_mode)
        self._val_txt: list[str] | None = None
        self._val_concat: torch.Tensor | None = None

    @staticmethod
    def latent_side(ae, image_size: int | None, family: str, backbone_cfg: dict) -> int:
        """The latent grid's side: image_size // the autoencoder's factor, or from its resolution when unset."""
        f = ae.downsample_factor
        if image_size is None:
            return int(ae.config.resolution) // f
        step = latent_grid_step(family, backbone_cfg)
        if image_size < 1 or image_size % (f * step):
            raise ValueError(f"model.image_size={image_size} must be a positive multiple of {f * step} (the "
                             f"autoencoder's factor {f} x the {family}'s latent grid step {step})")
        return image_size // f

    # --- the frozen autoencoder ------------------------------------------------------------------
    @property
    def autoencoder(self):
        ae = self._ae[0]
        if module_device(ae) != self.device:
            self._ae[0] = ae = ae.to(self.device)
        return ae

    def check_latent_shards(self, shards, preprocess: dict | None = None) -> None:
        """Refuse latent shards made by another autoencoder (manifest next to `shards`), or (`preprocess`: the
        data config's image_size, resize_mode, random_flip, bucketing) from images made otherwise."""
        from ldm_lightning.data.shards import find_manifest

        from .encode import check_latent_manifest
        path = find_manifest(shards)
        if path is None:
            raise FileNotFoundError(f"latent shards {shards!r}: no manifest.json next to them, so the autoencoder "
                                    "that made them cannot be checked; keep the manifest written by `ldm-lightning "
                                    "data encode`, or set model.check_latent_hash=false")
        check_latent_manifest(path, self.autoencoder_hash, self.autoencoder_path, preprocess)

    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        data = datamodule_settings(self.trainer)
        if self.image_size is not None and data.get("image_size", self.image_size) != self.image_size:
            raise ValueError(f"model.image_size={self.image_size} but data.image_size={data['image_size']}: set both "
                             "to the size the model trains at")
        if self.check_latent_hash and data.get("kind") == "latent":
            # the latent cache's key on the data side (encode.check_preprocess)
            for shards in (dm.train_shards, getattr(dm, "val_shards", None)):
                if shards is not None:
                    self.check_latent_shards(shards, preprocess_settings(data))
        if data.get("kind") == "latent" and self.conditioner.cfg.kind == "text":
            from .text_cache import attach_text_cache  # cached caption embeddings: no text encoder is loaded
            attach_text_cache(self.conditioner, [dm.train_shards, getattr(dm, "val_shards", None)],
                              self.conditioner.cfg.text_cache)

    @torch.no_grad()
    def latents(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """Normalised latents (B, c, h, w) of a batch of images or of latent-shard moments."""
        from ldm_lightning.autoencoder.distributions import DiagonalGaussian
        ae = self.autoencoder
        if "moments" in batch:
            m = batch["moments"].float()  # (B, 2c, h, w)
            if m.shape[1] != 2 * ae.latent_channels:
                raise ValueError(f"latent batch has {m.shape[1]} moment channels; the autoencoder needs "
                                 f"{2 * ae.latent_channels} (mean ‖ logvar of {ae.latent_channels} channels)")
            post = DiagonalGaussian(m)
        elif "image" in batch:
            x = images_channels_last(model_range(batch["image"]), self.speed.channels_last)  # (B, C, H, W)
            dtype = ENCODE_DTYPES[self.encode_dtype]
            with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
                post = ae.encode(x)
            post = DiagonalGaussian(torch.cat([post.mean.float(), post.logvar.float()], 1))  # fp32 from here
        else:
            raise KeyError(f"batch has neither 'image' nor 'moments' (keys: {sorted(batch)}); use ShardDataModule "
                           "with kind='image' or kind='latent'")
        z = post.sample(generator) if self.sample_posterior else post.mode()  # (B, c, h, w)
        return ae.normalize_latents(z)

    # --- the step --------------------------------------------------------------------------------
    def c_concat(self, batch: dict, latent_hw: tuple[int, int], generator: torch.Generator | None) -> torch.Tensor:
        """The concatenation condition of an image batch (low-res image, or masked image's latent + mask)."""
        if "image" not in batch:
            raise ValueError(f"conditioning.concat={self.conditioner.cfg.concat!r} degrades the clean images, so it "
                             "needs image batches: set data.kind=image (latent shards hold no pixels)")
        cfg = self.conditioner.cfg
        if cfg.concat == "semantic":
            if "class_map" not in batch:
                raise ValueError("conditioning.concat='semantic' reads each image's class map: set data.members.map_ext (e.g. "
                                 "seg.png, written by `data pack --source mnist-canvas --class-maps`)")
            return build_c_concat("semantic", latent_hw, class_map=batch["class_map"], map_classes=cfg.map_classes)
        images = model_range(batch["image"]).float()  # (B, C, H, W)
        return training_c_concat(cfg.concat, images, latent_hw, cfg.sr_factor, generator, self.autoencoder,
                                 cfg.inpaint_masks)  # (B, C_cat, h, w)

    def _loss(self, batch, denoiser, g_post, g_cond, g_noise, drop: float | None = None):
        z0 = self.latents(batch, g_post)  # (B, c, h, w)
        cond = self.conditioner(batch, g_cond, drop_prob=drop)
        if self.conditioner.cfg.concat != "none":  # never dropped: guidance acts on the class / text only
            cond["c_concat"] = self.c_concat(batch, tuple(z0.shape[-2:]), g_cond)
        out = self.objective.loss(denoiser, z0, cond, g_noise)  # per-sample (B,)
        return out.loss.mean(), out

    def compute_loss(self, batch):
        gens = (self.step_generator("posterior"), self.step_generator("cond_drop"), self.step_generator("noise"))
        terms = {}
        if self.repa is None:
            loss, out = self._loss(batch, self.denoiser, *gens)
        else:
            with BlockTap(self.denoiser.backbone.blocks[self.repa_cfg.block - 1]) as tap:
                loss, out = self._loss(batch, self.denoiser, *gens)
            repa = self.repa_loss(batch, tap.tokens)
            terms["diffusion_loss"], terms["repa_loss"] = loss.detach(), repa.detach()  # train/loss is the sum
            loss = loss + self.repa_cfg.weight * repa
        if self.loss_bins and is_logging_step(self):  # 1 host sync per bin: only when Lightning logs them
            terms.update({f"loss_bin_{k[6:]}": v
                          for k, v in loss_by_bin(out.loss, out.t_fraction, self.loss_bins).items()})
        return loss, terms

    def repa_loss(self, batch: dict, tokens: torch.Tensor) -> torch.Tensor:
        """REPA loss of the tapped block's image tokens (of (B, [K +] N [+ L], D), K in-context class tokens) against
        the frozen encoder's features of the batch's clean images."""
        if "image" not in batch:
            raise REPAError("repa.encoder is set: REPA aligns to features of the clean images, so it needs image "
                            "batches; set data.kind=image (latent shards hold no pixels)")
        images = model_range(batch["image"]).float()  # (B, C, H, W)
        enc = self._repa_encoder[0]
        if module_device(enc) != self.device:
            self._repa_encoder[0] = enc = enc.to(self.device)
        with torch.no_grad():
            features = enc(images)  # (B, C_f, h_f, w_f)
        step = self.autoencoder.downsample_factor * self.denoiser.backbone.cfg.patch_size
        h, w = images.shape[-2] // step, images.shape[-1] // step  # the token grid
        lead = self.denoiser.backbone.leading_tokens(self.repa_cfg.block - 1)  # in-context class tokens (JiT)
        return self.repa(tokens[:, lead:lead + h * w], features, h, w)

    def validation_step(self, batch, batch_idx):
        # Fixed draws per validation batch: val/loss of successive validations differ only by the weights.
        g = [torch.Generator(self.device).manual_seed(self.val_seed * 1_000_003 + batch_idx * 7 + k) for k in range(3)]
        loss, out = self._loss(batch, self.ema_or_live(), *g, drop=0.0)
        self.log("val/loss", loss, sync_dist=True, batch_size=out.loss.shape[0])
        if batch_idx == 0 and "txt" in batch:
            self._val_txt = list(batch["txt"])
        if batch_idx == 0 and self.conditioner.cfg.concat != "none":
            g = torch.Generator(self.device).manual_seed(self.val_seed)
            self._val_concat = self.c_concat(batch, tuple(self.meta["latent_shape"][1:]), g)[:self.val_num]

    def fsdp2_refusal(self) -> str | None:
        return None  # every option shards (compile before fully_shard; post-hoc EMA profiles sharded like the EMA)

    def on_validation_epoch_end(self) -> None:
        # Sharded (FSDP2) weights: every rank samples (each forward all-gathers), rank 0 logs.
        if self.val_num == 0 or self.trainer.sanity_checking or (self.global_rank != 0 and not self.is_sharded):
            return
        from ldm_lightning.training.media import log_image_grid
        kind = self.conditioner.cfg.kind
        if kind == "text" and self.val_prompts:
            self.log_prompt_gallery()
            return
        spec = {}
        if kind == "class":
            spec = {"labels": [i % self.conditioner.cfg.num_classes for i in range(self.val_num)]}
        elif kind == "text":
            txt = self._val_txt or [""]
            spec = {"prompts": [txt[i % len(txt)] for i in range(self.val_num)]}
        elif kind == "layout":  # the first validation batch's layouts
            txt = self._val_txt or ["[]"]
            spec = {"layouts": [parse_layout_text(txt[i % len(txt)], "validation layout") for i in range(self.val_num)]}
        if self.conditioner.cfg.concat != "none":
            if self._val_concat is None:
                return  # no validation batch seen yet: nothing to condition on
            c = self._val_concat
            spec["c_concat"] = c.repeat((self.val_num + len(c) - 1) // len(c), 1, 1, 1)[:self.val_num]
        images = sample_images(self.ema_or_live(), self.conditioner, self.autoencoder, self.meta["latent_shape"],
                               self.val_num, self.val_sampling, **spec)
        if self.global_rank != 0:
            return
        log_image_grid(self.trainer, "val/samples", image_grid(images), self.global_step, png_dir="samples")

    def log_prompt_gallery(self) -> None:
        """The fixed prompts x fixed seeds grid (val_prompts), from the EMA and, when they differ, the raw weights;
        at every aspect bucket's size when the data has buckets (prompt_gallery.py)."""
        from ldm_lightning.training.media import log_image_grid

        from .prompt_gallery import gallery_grid, gallery_latent_shapes
        per = max(1, self.val_num // len(self.val_prompts))
        shapes = gallery_latent_shapes(self.meta["latent_shape"], self.autoencoder.downsample_factor,
                                       datamodule_settings(self.trainer).get("bucketing"))
        nets = {"": self.ema_or_live()}
        if nets[""] is not self.denoiser:
            nets["_raw"] = self.denoiser
        for suffix, net in nets.items():
            grid = gallery_grid(net, self.conditioner, self.autoencoder, shapes, self.val_prompts, per,
                                self.val_sampling)
            if self.global_rank == 0:  # under FSDP2 every rank samples (see on_validation_epoch_end)
                log_image_grid(self.trainer, f"val/samples{suffix}", grid, self.global_step,
                               caption=" | ".join(self.val_prompts), png_dir=f"samples{suffix}")

    def on_save_checkpoint(self, checkpoint) -> None:
        # What `ldm-lightning sample` / `export` rebuild the denoiser from (plain values: weights_only loads).
        checkpoint["ldm_lightning"] = dict(self.meta)
        sd = checkpoint.get("state_dict")  # (DeepSpeed writes its own shards; then there is none here)
        if self.lora_cfg.enabled and sd:  # the frozen base is init_from's: keep it out (live and EMA copies)
            for k in self.frozen_base_keys() & set(sd):
                del sd[k]

    def frozen_base_keys(self) -> set[str]:
        """State-dict keys of the frozen backbone tensors under LoRA (live and EMA): what init_from supplies."""
        names = {n for n, p in self.denoiser.named_parameters() if not p.requires_grad and not is_adapter_key(n)}
        return {f"{pre}{n}" for n in names for pre in ("denoiser.", "ema.module.")}

    def on_load_checkpoint(self, checkpoint) -> None:
        # A LoRA checkpoint lacks the frozen base: take it from init_from (loaded at construction), so the
        # state dict loads strictly and a resume is exact.
        sd = checkpoint.get("state_dict")
        if self.lora_cfg.enabled and sd is not None:
            own = self.state_dict()
            for k in self.frozen_base_keys():
                if k in own and k not in sd:
                    sd[k] = own[k]

    def optimizer_param_groups(self):
        params = [p for p in self.denoiser.parameters() if p.requires_grad]
        return params + ([] if self.repa is None else list(self.repa.parameters()))
