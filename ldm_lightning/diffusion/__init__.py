"""Stage 2: denoiser backbones, schedules, the loss, samplers, guidance, conditioning.

Everything meets at one interface, `Denoiser(x_t, t, cond) -> Prediction(x0, eps, ...)` (denoiser.py):
the loss (`DiffusionObjective.loss`, loss.py) and every sampler (`SAMPLERS[name](fn, x_T, schedule, steps)`)
talk only to it, so backbones, prediction types and schedules combine freely. `load_denoiser` (load.py)
rebuilds a trained one without Lightning, `load_pipeline` / `sample_images` (sampling.py) sample it;
concat.py holds the super-resolution / inpainting conditions.
"""

from .conditioning import Conditioner, ConditioningConfig
from .ddt import DDT, DDTConfig, encoder_reuse
from .dit import DiT, DiTConfig
from .load import build_denoiser_parts, load_denoiser
from .guidance import cfg_denoiser, concat_cond
from .loss import DiffusionObjective, LossOutput, ObjectiveConfig, loss_by_bin
from .denoiser import PREDICTIONS, Denoiser, Prediction, from_x0_eps, to_x0_eps
from .presets import PRESETS, build_backbone
from .repa import REPAConfig
from .samplers import SAMPLERS, get_sampler
from .sampling import SamplingConfig, SamplingPipeline, load_pipeline, sample_images
from .schedules import FlowSchedule, VPSchedule, build_schedule, make_betas, rescale_zero_terminal_snr
from .sd_unet import SDUNet, SDUNetConfig
from .unet import UNet, UNetConfig

__all__ = [
    "Conditioner", "ConditioningConfig", "DiT", "DiTConfig", "cfg_denoiser", "concat_cond",
    "DiffusionObjective", "LossOutput", "ObjectiveConfig", "loss_by_bin", "PREDICTIONS", "Denoiser", "Prediction",
    "from_x0_eps", "to_x0_eps", "PRESETS", "build_backbone", "SAMPLERS", "get_sampler", "FlowSchedule",
    "VPSchedule", "build_schedule", "make_betas", "rescale_zero_terminal_snr", "UNet", "UNetConfig",
    "SDUNet", "SDUNetConfig",
    "build_denoiser_parts", "load_denoiser", "DDT", "DDTConfig", "encoder_reuse", "REPAConfig",
    "SamplingConfig", "SamplingPipeline", "load_pipeline", "sample_images",
]
