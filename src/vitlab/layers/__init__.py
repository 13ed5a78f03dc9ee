"""Reusable parts shared by vitlab's model families; imports only torch, timm.layers and layers/.

One import line per module (plus an ``__all__ +=`` line for its names), so parallel additions do not collide.
"""

__all__: list[str] = []
from .attention import Attention, attend

__all__ += ["Attention", "attend"]
from .backbone import HierarchicalBackbone, IsotropicBackbone

__all__ += ["HierarchicalBackbone", "IsotropicBackbone"]
from .block import ConvDownsample, Grid, MetaBlock, Stage, map_to_tokens, tokens_to_map

__all__ += ["ConvDownsample", "Grid", "MetaBlock", "Stage", "map_to_tokens", "tokens_to_map"]
from .camera import CameraError, Cameras, camera_rays, look_at, plucker

__all__ += ["CameraError", "Cameras", "camera_rays", "look_at", "plucker"]
from .camera_attention import (
    CameraAttentionAdapter,
    CameraSelfAttention,
    patch_rope_angles,
    prope_attention,
    prope_transforms,
    ray_rope_angles,
    relative_ray_transforms,
    tokens_from_views,
)

__all__ += [
    "CameraAttentionAdapter",
    "CameraSelfAttention",
    "patch_rope_angles",
    "prope_attention",
    "prope_transforms",
    "ray_rope_angles",
    "relative_ray_transforms",
    "tokens_from_views",
]
from .camera_embed import (
    FourierRayEmbed,
    PluckerEmbed,
    RayConv,
    absolute_orientation_map,
    fourier_ray_features,
    plucker_embed,
)

__all__ += [
    "FourierRayEmbed",
    "PluckerEmbed",
    "RayConv",
    "absolute_orientation_map",
    "fourier_ray_features",
    "plucker_embed",
]
from .compression import GDN, AnalysisTransform, compressai_encoder_state_dict

__all__ += ["GDN", "AnalysisTransform", "compressai_encoder_state_dict"]
from .fast import FAST_PATHS, FastPath, fast_forward, fast_paths, fast_paths_enabled, fast_paths_taken, set_fast_paths

__all__ += [
    "FAST_PATHS",
    "FastPath",
    "fast_forward",
    "fast_paths",
    "fast_paths_enabled",
    "fast_paths_taken",
    "set_fast_paths",
]
from .deform_attn import (
    MultiScaleDeformableAttention,
    flatten_levels,
    multi_scale_deformable_attention,
    reference_points_for,
)

__all__ += [
    "MultiScaleDeformableAttention",
    "flatten_levels",
    "multi_scale_deformable_attention",
    "reference_points_for",
]
from .dpt import DPTHead, resample_conv, scale_shift_invariant_loss

__all__ += ["DPTHead", "resample_conv", "scale_shift_invariant_loss"]
from .embed import ConvEmbed

__all__ += ["ConvEmbed"]
from .hyena import HyenaFilter, HyenaMixer, fft_long_conv

__all__ += ["HyenaFilter", "HyenaMixer", "fft_long_conv"]
from .maf import GlobalDownsample, MultiScaleAttentionFusion, pooling_weights

__all__ += ["GlobalDownsample", "MultiScaleAttentionFusion", "pooling_weights"]
from .mixers import MIXERS, get_mixer

__all__ += ["MIXERS", "get_mixer"]
from .mlp import ConvFfn

__all__ += ["ConvFfn"]
from .moe import MixtureOfExperts, RouterOutput, TopKRouter, balance_loss, cv_squared, select_top_k

__all__ += ["MixtureOfExperts", "RouterOutput", "TopKRouter", "balance_loss", "cv_squared", "select_top_k"]
from .task_moe import MoEAttention, TaskMoEMlp, TaskRouter, mutual_information, task_routed_modules

__all__ += ["MoEAttention", "TaskMoEMlp", "TaskRouter", "mutual_information", "task_routed_modules"]
from .msa_conv import MSAConv, msa_conv_windows

__all__ += ["MSAConv", "msa_conv_windows"]
from .necks import FeaturePyramidNeck, SimpleFeaturePyramid

__all__ += ["FeaturePyramidNeck", "SimpleFeaturePyramid"]
from .packing import PackedSequences, pack_sequences

__all__ += ["PackedSequences", "pack_sequences"]
from .polyline_mask import AxialPolylinePathAttention, PolylinePathAttention, polyline_path_mask, segment_sum

__all__ += ["AxialPolylinePathAttention", "PolylinePathAttention", "polyline_path_mask", "segment_sum"]
from .pos_embed import GlobalPosEmbed, LocalPosEmbed, apply_rope, grid_positions, rope_2d_angles, sincos_2d_normalized

__all__ += ["GlobalPosEmbed", "LocalPosEmbed", "apply_rope", "grid_positions", "rope_2d_angles", "sincos_2d_normalized"]
from .retention import RETENTION_FORMS, Retention, run_retention_form

__all__ += ["RETENTION_FORMS", "Retention", "run_retention_form"]
from .dtcwt import dtcwt2d, idtcwt2d
from .scattering import ScatteringMixer

__all__ += ["ScatteringMixer", "dtcwt2d", "idtcwt2d"]
from .multiscale_scan import SelectiveScan2d
from .selective_scan import selective_scan, selective_scan_macs, selective_scan_ref

__all__ += ["SelectiveScan2d", "selective_scan", "selective_scan_macs", "selective_scan_ref"]
from .shiftadd import BinaryLinearAttention, ShiftLinear, binarize_ste, round_power_of_two

__all__ += ["BinaryLinearAttention", "ShiftLinear", "binarize_ste", "round_power_of_two"]
from .spectral import SpectralGating, global_filter, resample_spectral_filter

__all__ += ["SpectralGating", "global_filter", "resample_spectral_filter"]
from .strip_attention import StripAttention

__all__ += ["StripAttention"]
from .temporal import DepthwiseTemporalConv, InflatedPatchConv, TemporalConvBlock

__all__ += ["DepthwiseTemporalConv", "InflatedPatchConv", "TemporalConvBlock"]
from .tracing import is_fx_tracing

__all__ += ["is_fx_tracing"]
from .window_attention import WindowAttention, shifted_window_mask, window_partition, window_reverse

__all__ += ["WindowAttention", "shifted_window_mask", "window_partition", "window_reverse"]
# the fast paths register themselves; entries for one class are tried in this order (mamba_ssm's CUDA scan,
# then the compiled CPU scan, then the chunked one)
from .fast import mamba, onednn, scan  # noqa: F401
from .dit import (
    AdaLNZeroBlock,
    DiTOutputLayer,
    LabelEmbedder,
    TimestepEmbedder,
    modulate,
    patchify,
    timestep_embedding,
    unpatchify,
)

__all__ += [
    "AdaLNZeroBlock",
    "DiTOutputLayer",
    "LabelEmbedder",
    "TimestepEmbedder",
    "modulate",
    "patchify",
    "timestep_embedding",
    "unpatchify",
]
