"""Generative networks of DG-Net: structure encoder E_s, decoder G (with its AdaIN MLPs) and the
multi-scale discriminator D, plus the losses that belong to D (LSGAN and R1).

Written from the architecture facts in the paper's appendix (tables 6-8) and in
shared/REFERENCE.md; no reference code was used. The appearance encoder E_a is the re-id backbone
and lives elsewhere: here the appearance code is just an input tensor of shape
(B, appearance_channels, appearance_parts, 1).

Parameter counts at the ``PAPER`` preset (they are pinned by tests/test_dgnet_networks.py):
E_s 380,544; decoder 1,455,555; AdaIN MLPs 11,544,576; D (3 scales) 1,025,571.
REFERENCE.md's "G total 13.38M" is decoder + MLPs + E_s (13,380,675); decoder + MLPs alone is
13,000,131.

Two layouts compute with the same parameters (same names, same shapes): ``"project"``, what this
project first wrote, and ``"reference"``, what the public DG-Net checkpoints were trained with
(REFERENCE.md, "Reference checkpoint layout"). Each difference is one `GeneratorConfig` field;
`LAYOUTS` names the two sets of values and `with_layout` applies one. A saved configuration that
lacks the layout fields (written before they existed) reads back as the project layout.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

LRELU_SLOPE = 0.2


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GeneratorConfig:
    """Every knob that differs between presets. Defaults are the paper's 256x128 network in the
    project layout (`PAPER` is the same network in the reference layout)."""

    image_size: tuple[int, int] = (256, 128)  # (H, W) of images fed to E_s, produced by G, seen by D
    # Appearance code = backbone feature map max-pooled to (parts x 1); channels come from E_a.
    appearance_channels: int = 2048
    appearance_parts: int = 4
    # E_s: widths of Conv1 (stride 2), Conv2, Conv3, Conv4 (stride 2); structure code is H/4 x W/4.
    es_channels: tuple[int, int, int, int] = (16, 32, 32, 64)
    es_res_blocks: int = 4
    aspp_channels: int = 32  # width of each of the 1 + len(aspp_dilations) ASPP branches
    aspp_dilations: tuple[int, ...] = (3, 6, 9)
    structure_channels: int = 128  # output of the ASPP fusion 1x1 conv = structure-code channels
    # G: AdaIN residual blocks at structure_channels, then one (upsample x2, conv5x5) stage per
    # entry of dec_up_channels, then dec_out_convs conv3x3 at the last width, then conv1x1 -> RGB.
    dec_res_blocks: int = 4
    dec_up_channels: tuple[int, ...] = (64, 32)
    dec_out_convs: int = 2
    # One MLP per AdaIN layer (2 per residual block): appearance part -> (scale, bias).
    mlp_hidden: int = 512
    mlp_layers: int = 3  # number of Linear layers (2048 -> 512 -> 512 -> 256 is 3)
    # Standardise every (channel, part) of the appearance code over the batch before the MLPs
    # (running statistics in eval mode), so that the MLPs see what tells people apart, each channel
    # at unit scale, rather than the max-pooled features' raw, sparse values. Off in the paper.
    code_norm: bool = False
    # Region-adaptive AdaIN: every AdaIN layer reads all the parts, and its (scale, bias) varies
    # over the height, part p's values at stripe p's centre and linear in between (per-region
    # styles, as in SEAN). Off in the paper, where block k reads part k and its parameters act on
    # the whole image: G must then learn which code belongs to which rows of the body.
    adain_bands: bool = False
    # Appearance-modulated RGB head: the last 1x1 conv's weights and bias get an appearance-dependent
    # offset, per part and stretched over the height as the banded AdaIN (StyleGAN2's modulated toRGB
    # with per-region styles). Zero at initialisation. It gives colour a one-layer path from the
    # code to the pixels, where the AdaIN path is deep and learns it slowly. Off in the paper.
    rgb_modulation: bool = False
    # ---- layout: how the same parameters are used (see LAYOUTS). The defaults are the project
    # layout, so that a saved configuration without these fields keeps meaning what it meant.
    # AdaIN scale parameterisation: True -> IN(x) * (1 + s) + b, False -> IN(x) * s + b (reference).
    # Both have the same parameter count; the offset keeps the residual branches alive at init.
    adain_scale_offset: bool = True
    # ASPP: lrelu after the 1x1 branch and after each dilated 3x3 conv (True), or no activation
    # there (reference: only the 1x1 convs in front of the dilated ones have one). Never after the fuse.
    aspp_branch_activation: bool = True
    # AdaIN MLPs, 2 * dec_res_blocks of them either way:
    # "per_layer": MLP m drives AdaIN layer m and outputs (scale, bias) of that layer;
    # "per_block" (reference): MLPs 0..N-1 give scales, N..2N-1 biases; MLP k (resp. N+k) outputs the
    #   scales (resp. biases) of block k's first then second AdaIN layer.
    mlp_grouping: str = "per_layer"
    # What block k's MLPs read, with C = appearance_channels, P = appearance_parts:
    # "stripes": stripe part_of_block(k) of the (B, C, P, 1) code, i.e. its C channels;
    # "channel_major" (reference): chunk part_of_block(k) of the code flattened channel-major
    #   (value index P * channel + stripe), i.e. values [C*j, C*j + C).
    appearance_chunks: str = "stripes"
    # Decoder LayerNorm: "group_norm": (x - mean) / sqrt(var + eps), biased variance over C x H x W;
    # "unbiased_std" (reference): (x - mean) / (std + eps), unbiased std over C x H x W. Both then
    # apply the per-channel gain and bias.
    layer_norm: str = "group_norm"
    # D: per scale Conv1x1 3->c0, 3x3 c0->c0, 3x3 s2 c0->c0, 3x3 c0->c0, 3x3 s2 c0->c1,
    # dis_res_blocks residual blocks at c1, Conv1x1 c1->1.
    dis_channels: tuple[int, int] = (32, 64)
    dis_res_blocks: int = 4
    dis_scales: int = 3

    def __post_init__(self) -> None:
        h, w = self.image_size
        if len(self.dec_up_channels) != 2:
            # E_s always downsamples by 4 (two stride-2 convs), so G must upsample twice.
            raise ValueError("dec_up_channels must have exactly 2 entries (E_s downsamples by 4)")
        d_factor = 2 ** (self.dis_scales + 1)  # two stride-2 convs + (scales - 1) poolings
        if h % 4 or w % 4 or h % d_factor or w % d_factor:
            raise ValueError(f"image_size {self.image_size} must be divisible by 4 and {d_factor}")
        if self.aspp_dilations and max(self.aspp_dilations) >= min(h // 4, w // 4):
            raise ValueError("reflect padding needs every ASPP dilation < structure-code H and W")
        if self.mlp_layers < 1 or self.dis_scales < 1 or self.dec_res_blocks < 1:
            raise ValueError("mlp_layers, dis_scales and dec_res_blocks must be >= 1")
        for name, allowed in _LAYOUT_CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}; expected one of {', '.join(map(repr, allowed))}")

    @property
    def layout(self) -> str:
        """"project", "reference", or "mixed" when the layout fields match neither."""
        for name, values in LAYOUTS.items():
            if all(getattr(self, k) == v for k, v in values.items()):
                return name
        return "mixed"

    @property
    def structure_size(self) -> tuple[int, int]:
        """Spatial size (h, w) of the structure code."""
        return self.image_size[0] // 4, self.image_size[1] // 4

    @property
    def n_mlps(self) -> int:
        """Number of AdaIN layers = number of MLPs (two per decoder residual block)."""
        return 2 * self.dec_res_blocks

    def part_of_block(self, block: int) -> int:
        """Appearance part that drives decoder residual block ``block`` (identity when the counts
        match, as at both presets; otherwise parts are spread evenly over the blocks)."""
        return block * self.appearance_parts // self.dec_res_blocks


_LAYOUT_CHOICES: dict[str, tuple] = {
    "adain_scale_offset": (True, False),
    "aspp_branch_activation": (True, False),
    "mlp_grouping": ("per_layer", "per_block"),
    "appearance_chunks": ("stripes", "channel_major"),
    "layer_norm": ("group_norm", "unbiased_std"),
}

# The layout fields' values. "reference" computes what NVlabs/DG-Net's generator computes, so its
# public checkpoints (gen_*.pt) import tensor for tensor (generator_service.dgnet_import).
LAYOUTS: dict[str, dict[str, object]] = {
    "project": {"adain_scale_offset": True, "aspp_branch_activation": True, "mlp_grouping": "per_layer",
                "appearance_chunks": "stripes", "layer_norm": "group_norm"},
    "reference": {"adain_scale_offset": False, "aspp_branch_activation": False, "mlp_grouping": "per_block",
                  "appearance_chunks": "channel_major", "layer_norm": "unbiased_std"},
}


def with_layout(cfg: GeneratorConfig, layout: str) -> GeneratorConfig:
    """``cfg`` with every layout field set to the named layout's value."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown generator layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    return replace(cfg, **LAYOUTS[layout])


# The paper's network, computing as the reference code does.
PAPER = with_layout(GeneratorConfig(), "reference")

# CPU preset: half resolution, roughly half widths, same topology, 2 D scales. The appearance code
# comes from a light backbone (EfficientNet-Lite0: 1280 channels). Dilations are smaller because
# the structure code is 32x16: at half resolution the same dilations would reach twice as far.
SMALL = GeneratorConfig(
    image_size=(128, 64),
    appearance_channels=1280,
    appearance_parts=4,
    es_channels=(8, 16, 16, 32),
    es_res_blocks=4,
    aspp_channels=16,
    aspp_dilations=(2, 4, 6),
    structure_channels=64,
    dec_res_blocks=4,
    dec_up_channels=(32, 16),
    dec_out_convs=2,
    mlp_hidden=256,
    mlp_layers=3,
    dis_channels=(16, 32),
    dis_res_blocks=4,
    dis_scales=2,
)

# The small network with a short path for the appearance code into G (issue 22's third round of
# levers, docs/dgnet/fast.md): each stripe of the body styled by its own part of the code, and the
# colours one layer from it. Trained by the `fast` training preset.
FAST = replace(SMALL, adain_bands=True, rgb_modulation=True)

PRESETS: dict[str, GeneratorConfig] = {"paper": PAPER, "small": SMALL, "fast": FAST}


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
# All convolutions carry a bias and all InstanceNorms are affine-free: this is the one choice that
# reproduces E_s = 380,544 exactly (379,536 weights + 1,008 biases). Padding is reflect and keeps
# the size ("same") for stride 1; stride-2 3x3 convs halve it.


def conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    """Conv2d with bias and reflect padding of dilation * (kernel - 1) / 2."""
    pad = dilation * (kernel - 1) // 2
    return nn.Conv2d(in_ch, out_ch, kernel, stride, pad, dilation=dilation, bias=True,
                     padding_mode="reflect")


def lrelu() -> nn.LeakyReLU:
    return nn.LeakyReLU(LRELU_SLOPE, inplace=False)


def conv_in_act(in_ch: int, out_ch: int, kernel: int, stride: int = 1, dilation: int = 1,
                act: bool = True) -> nn.Sequential:
    """Conv + InstanceNorm (no affine) + optional LeakyReLU(0.2): the E_s unit."""
    layers: list[nn.Module] = [conv(in_ch, out_ch, kernel, stride, dilation),
                               nn.InstanceNorm2d(out_ch, affine=False)]
    if act:
        layers.append(lrelu())
    return nn.Sequential(*layers)


class ResBlock(nn.Module):
    """x + conv3x3-[IN]-lrelu-conv3x3-[IN](x); ``norm=False`` gives D's norm-free block."""

    def __init__(self, channels: int, norm: bool) -> None:
        super().__init__()

        def maybe_norm() -> nn.Module:
            return nn.InstanceNorm2d(channels, affine=False) if norm else nn.Identity()

        self.body = nn.Sequential(conv(channels, channels, 3), maybe_norm(), lrelu(),
                                  conv(channels, channels, 3), maybe_norm())

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def to_grey(x: Tensor) -> Tensor:
    """E_s input: mean of the three (ImageNet-normalised) channels, (B,3,H,W) -> (B,1,H,W).
    Colour is withheld from E_s so that appearance has to come from the appearance code."""
    return x.mean(dim=1, keepdim=True)


def reference_init(generator: Sequence[nn.Module], discriminator: nn.Module | None) -> None:
    """The reference code's initial weights: Kaiming-normal (fan_in) for every convolution and
    linear layer of E_s and G, N(0, 0.02) for D's, all biases 0; LayerNorm gains uniform(0, 1).
    (PyTorch's defaults are uniform and several times smaller for the AdaIN MLPs.) ``discriminator``
    None leaves D as it is (the projected D, whose frozen parts must keep their weights)."""
    for module in generator:
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")
                nn.init.zeros_(m.bias)
            elif isinstance(m, LayerNorm2d):
                nn.init.uniform_(m.weight, 0.0, 1.0)
    for m in discriminator.modules() if discriminator is not None else ():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            nn.init.zeros_(m.bias)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------
# E_s: structure encoder
# --------------------------------------------------------------------------------------------


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 branch and one (1x1, dilated 3x3) branch per
    dilation, each conv + IN, concatenated and fused by 1x1 + IN (no activation, so the structure
    code is the instance-normalised fusion output, as REFERENCE.md lists it). The 1x1 convs in
    front of the dilated ones end in lrelu; the branch outputs do too only with
    ``branch_activation`` (the project layout; the reference has none there)."""

    def __init__(self, in_ch: int, branch_ch: int, dilations: Sequence[int], out_ch: int,
                 branch_activation: bool = True) -> None:
        super().__init__()
        act = branch_activation
        self.branches = nn.ModuleList([conv_in_act(in_ch, branch_ch, 1, act=act)])
        for d in dilations:
            self.branches.append(nn.Sequential(conv_in_act(in_ch, branch_ch, 1),
                                               conv_in_act(branch_ch, branch_ch, 3, dilation=d, act=act)))
        self.fuse = conv_in_act(branch_ch * len(self.branches), out_ch, 1, act=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fuse(torch.cat([branch(x) for branch in self.branches], dim=1))


class StructureEncoder(nn.Module):
    """E_s: grey image (B,1,H,W) -> structure code (B, structure_channels, H/4, W/4).
    Shallow on purpose: it should keep pose/background geometry, not identity."""

    def __init__(self, cfg: GeneratorConfig = PAPER) -> None:
        super().__init__()
        c1, c2, c3, c4 = cfg.es_channels
        self.stem = nn.Sequential(conv_in_act(1, c1, 3, stride=2), conv_in_act(c1, c2, 3),
                                  conv_in_act(c2, c3, 3), conv_in_act(c3, c4, 3, stride=2))
        self.res = nn.Sequential(*[ResBlock(c4, norm=True) for _ in range(cfg.es_res_blocks)])
        self.aspp = ASPP(c4, cfg.aspp_channels, cfg.aspp_dilations, cfg.structure_channels,
                         cfg.aspp_branch_activation)

    def forward(self, grey: Tensor) -> Tensor:
        if grey.shape[1] != 1:
            raise ValueError(f"E_s takes a one-channel grey image (use to_grey), got {grey.shape}")
        return self.aspp(self.res(self.stem(grey)))


# --------------------------------------------------------------------------------------------
# G: decoder with AdaIN
# --------------------------------------------------------------------------------------------


def adain(x: Tensor, scale: Tensor, bias: Tensor, scale_offset: bool) -> Tensor:
    """Adaptive instance norm: per-sample, per-channel statistics replaced by (scale, bias)
    predicted from the appearance code, either (B, C) for the whole image, or (B, C, P): P values
    down the height, stretched linearly over it (region-adaptive)."""
    if scale.dim() == 3:
        scale, bias = (F.interpolate(t, size=x.shape[2], mode="linear", align_corners=False)[..., None]
                       for t in (scale, bias))
    else:
        scale, bias = scale[:, :, None, None], bias[:, :, None, None]
    gain = 1.0 + scale if scale_offset else scale
    return F.instance_norm(x) * gain + bias


class AdaINResBlock(nn.Module):
    """x + conv3x3-AdaIN-lrelu-conv3x3-AdaIN(x); the two AdaIN layers get separate parameters."""

    def __init__(self, channels: int, scale_offset: bool) -> None:
        super().__init__()
        self.conv1 = conv(channels, channels, 3)
        self.conv2 = conv(channels, channels, 3)
        self.act = lrelu()
        self.scale_offset = scale_offset

    def forward(self, x: Tensor, params1: tuple[Tensor, Tensor],
                params2: tuple[Tensor, Tensor]) -> Tensor:
        h = self.act(adain(self.conv1(x), *params1, self.scale_offset))
        return x + adain(self.conv2(h), *params2, self.scale_offset)


class LayerNorm2d(nn.Module):
    """Per-sample layer norm over (C, H, W) with a learnable per-channel affine (MUNIT-style
    decoder norm). ``unbiased_std=False``: (x - mean) / sqrt(var + eps) with the biased variance
    (group_norm with one group); ``True`` (the reference): (x - mean) / (std + eps) with the
    unbiased standard deviation."""

    def __init__(self, channels: int, eps: float = 1e-5, unbiased_std: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps
        self.unbiased_std = unbiased_std

    def forward(self, x: Tensor) -> Tensor:
        if not self.unbiased_std:
            return F.group_norm(x, 1, self.weight, self.bias, self.eps)
        if x.dtype in (torch.float16, torch.bfloat16):  # statistics in fp32, as autocast runs group_norm
            x = x.float()
        return _UnbiasedLayerNorm.apply(x, self.weight, self.bias, self.eps)


class _UnbiasedLayerNorm(torch.autograd.Function):
    """gain * (x - mean) / (std + eps) + bias per sample over (C, H, W), std unbiased, with a
    hand-written backward: 1.5-2x faster on the CPU than autograd through std_mean (two reductions
    and two multiply-adds over the full tensor instead of a chain of elementwise ops). The
    backward is first-order only (no R1-style double backward passes through G). Derivation, per sample with n = C*H*W,
    c = x - mean, d = std + eps, g = dL/dy * gain:
    dL/dx = (g - mean(g)) / d - sum(g * c) * c / (d^2 (n - 1) std)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        std, mean = torch.std_mean(x.reshape(x.shape[0], -1), dim=1)
        d = std + eps
        a = weight[None, :] / d[:, None]  # y = x * a + (bias - mean * a): one multiply-add
        ctx.save_for_backward(x, weight, mean, std, d)
        return torch.addcmul((bias[None, :] - mean[:, None] * a)[:, :, None, None], x, a[:, :, None, None])

    @staticmethod
    @once_differentiable  # the saved statistics carry no graph: a second derivative raises, never errs
    def backward(ctx, gy: Tensor):  # type: ignore[override]
        x, weight, mean, std, d = ctx.saved_tensors
        n = x[0].numel()
        gx_sum = (gy * x).sum(dim=(2, 3))  # (B, C): sums over H, W
        g_sum = gy.sum(dim=(2, 3))
        grad_weight = ((gx_sum - mean[:, None] * g_sum) / d[:, None]).sum(0)
        grad_bias = g_sum.sum(0)
        sg = (g_sum * weight[None, :]).sum(1)  # per sample: sum of g, sum of g * c
        sgc = (gx_sum * weight[None, :]).sum(1) - mean * sg
        k = sgc / (d * d * (n - 1) * std.clamp_min(1e-30))  # std = 0 means c = 0: the term vanishes
        shift = (k * mean - sg / (n * d))[:, None].expand(-1, x.shape[1])
        grad_x = torch.addcmul(shift[:, :, None, None], gy, (weight[None, :] / d[:, None])[:, :, None, None])
        return grad_x - x * k[:, None, None, None], grad_weight, grad_bias, None


def mlp(in_dim: int, hidden: int, out_dim: int, layers: int) -> nn.Sequential:
    """Linear stack in_dim -> hidden -> ... -> out_dim with lrelu between (not after the last)."""
    dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
    modules: list[nn.Module] = []
    for i in range(layers):
        modules.append(nn.Linear(dims[i], dims[i + 1]))
        if i < layers - 1:
            modules.append(lrelu())
    return nn.Sequential(*modules)


class RGBOffsets(nn.Module):
    """The appearance-modulated part of G's RGB head (``rgb_modulation``): per part, offsets of
    the 1x1 RGB conv's (3 x C) weights and 3 biases, linear in the part's code, stretched over the
    height as the banded AdaIN. Zero at initialisation (``reference_init`` leaves it so: it is not
    an ``nn.Linear``), so G starts as it would without it. The weights are scaled by
    1/sqrt(code channels) when used (StyleGAN's equalised learning rate): Adam moves every weight by
    about its learning rate per step, and over a code of a thousand channels unscaled steps would
    swing the colours by tenths of a unit at each one."""

    def __init__(self, appearance_channels: int, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(3 * (channels + 1), appearance_channels))
        self.bias = nn.Parameter(torch.zeros(3 * (channels + 1)))
        self.gain = appearance_channels ** -0.5

    def forward(self, parts: Tensor, features: Tensor) -> Tensor:
        b, ch, h, _ = features.shape
        offsets = F.linear(parts, self.weight * self.gain, self.bias)  # (B, P, 3 (C + 1))
        rows = F.interpolate(offsets.transpose(1, 2), size=h, mode="linear", align_corners=False)
        rows = rows.reshape(b, 3, ch + 1, h)
        return torch.einsum("bckh,bkhw->bchw", rows[:, :, :ch], features) + rows[:, :, ch, :, None]


class Decoder(nn.Module):
    """G: (appearance code, structure code) -> image in normalised space (no tanh).

    AdaIN mapping (MLPs = 8 x 1,443,072 = 11,544,576 at paper size, both groupings): decoder
    residual block k has two AdaIN layers, and its MLPs read appearance chunk p = part_of_block(k)
    (= k with 4 parts and 4 blocks): stripe p (``appearance_chunks="stripes"``) or values
    [C*p, C*p + C) of the channel-major flattened code (``"channel_major"``). Each MLP outputs
    2 x structure_channels values.
    ``mlp_grouping="per_layer"``: MLP 2k feeds block k's first AdaIN layer, 2k+1 its second; the
    output halves are (scale, bias). ``"per_block"``: MLP k gives (first layer's scales, second
    layer's scales) of block k and MLP N+k the same for the biases.
    """

    def __init__(self, cfg: GeneratorConfig = PAPER) -> None:
        super().__init__()
        self.cfg = cfg
        ch = cfg.structure_channels
        self.mlps = nn.ModuleList([mlp(cfg.appearance_channels, cfg.mlp_hidden, 2 * ch, cfg.mlp_layers)
                                   for _ in range(cfg.n_mlps)])
        self.code_norm = (nn.BatchNorm1d(cfg.appearance_channels * cfg.appearance_parts, affine=False)
                          if cfg.code_norm else None)
        self.res_blocks = nn.ModuleList([AdaINResBlock(ch, cfg.adain_scale_offset)
                                         for _ in range(cfg.dec_res_blocks)])
        unbiased = cfg.layer_norm == "unbiased_std"
        up: list[nn.Module] = []
        for out_ch in cfg.dec_up_channels:
            up += [nn.Upsample(scale_factor=2, mode="nearest"), conv(ch, out_ch, 5),
                   LayerNorm2d(out_ch, unbiased_std=unbiased), lrelu()]
            ch = out_ch
        self.upsample = nn.Sequential(*up)
        head: list[nn.Module] = []
        for _ in range(cfg.dec_out_convs):
            head += [conv(ch, ch, 3), lrelu()]
        head.append(conv(ch, 3, 1))
        self.head = nn.Sequential(*head)
        self.rgb_offsets = RGBOffsets(cfg.appearance_channels, ch) if cfg.rgb_modulation else None

    def parameter_counts(self) -> dict[str, int]:
        """{'decoder': convolutional part, 'mlps': AdaIN MLPs}, the split REFERENCE.md uses."""
        n_mlp = count_parameters(self.mlps)
        return {"decoder": count_parameters(self) - n_mlp, "mlps": n_mlp}

    def _parts(self, code: Tensor) -> Tensor:
        """(B, C, P, 1) or its flatten(1) (B, C*P) -> (B, P, C): the P chunks the MLPs read
        (stripes, or consecutive runs of the channel-major flattened code; see the class doc)."""
        c, p = self.cfg.appearance_channels, self.cfg.appearance_parts
        if code.dim() == 4 and tuple(code.shape[1:]) == (c, p, 1):
            code = code.flatten(1)
        elif not (code.dim() == 2 and code.shape[1] == c * p):
            raise ValueError(f"appearance code must be (B,{c},{p},1) or (B,{c * p}), got {tuple(code.shape)}")
        if self.code_norm is not None:
            code = self.code_norm(code)
        if self.cfg.appearance_chunks == "channel_major":
            return code.view(code.shape[0], p, c)
        return code.view(code.shape[0], c, p).transpose(1, 2)

    def adain_params(self, appearance_code: Tensor) -> list[tuple[Tensor, Tensor]]:
        """One (scale, bias) pair per AdaIN layer, in decoder order: (B, C) each, or (B, C, P)
        with ``adain_bands`` (one column per part, top to bottom)."""
        return self._adain_params(self._parts(appearance_code))

    def _adain_params(self, parts: Tensor) -> list[tuple[Tensor, Tensor]]:
        cfg = self.cfg

        def run(net: nn.Module, block: int) -> tuple[Tensor, Tensor]:
            if cfg.adain_bands:  # (B, P, 2C) -> two (B, C, P)
                first, second = net(parts).chunk(2, dim=-1)
                return first.transpose(1, 2), second.transpose(1, 2)
            first, second = net(parts[:, cfg.part_of_block(block)]).chunk(2, dim=-1)
            return first, second

        out = []
        if cfg.mlp_grouping == "per_block":
            n = cfg.dec_res_blocks
            for k in range(n):
                scales, biases = run(self.mlps[k], k), run(self.mlps[n + k], k)
                out += [(scales[0], biases[0]), (scales[1], biases[1])]
            return out
        return [run(net, m // 2) for m, net in enumerate(self.mlps)]

    def forward(self, appearance_code: Tensor, structure_code: Tensor) -> Tensor:
        parts = self._parts(appearance_code)
        params = self._adain_params(parts)
        x = structure_code
        for k, block in enumerate(self.res_blocks):
            x = block(x, params[2 * k], params[2 * k + 1])
        if self.rgb_offsets is None:
            return self.head(self.upsample(x))
        features = self.head[:-1](self.upsample(x))
        return self.head[-1](features) + self.rgb_offsets(parts, features)


# --------------------------------------------------------------------------------------------
# D: multi-scale PatchGAN and its losses
# --------------------------------------------------------------------------------------------


class PatchDiscriminator(nn.Module):
    """One scale of D: image (B,3,h,w) -> patch logits (B,1,h/4,w/4). No normalisation."""

    def __init__(self, c0: int, c1: int, res_blocks: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            conv(3, c0, 1), lrelu(),
            conv(c0, c0, 3), lrelu(),
            conv(c0, c0, 3, stride=2), lrelu(),
            conv(c0, c0, 3), lrelu(),
            conv(c0, c1, 3, stride=2), lrelu(),
            *[ResBlock(c1, norm=False) for _ in range(res_blocks)],
            conv(c1, 1, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class MultiScaleDiscriminator(nn.Module):
    """D: the same PatchGAN architecture (separate weights) at full, 1/2, 1/4... resolution.
    LSGAN targets: real -> 1, fake -> 0 for D; fake -> 1 for G."""

    def __init__(self, cfg: GeneratorConfig = PAPER) -> None:
        super().__init__()
        c0, c1 = cfg.dis_channels
        self.scales = nn.ModuleList([PatchDiscriminator(c0, c1, cfg.dis_res_blocks)
                                     for _ in range(cfg.dis_scales)])
        self.downsample = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)

    def forward(self, x: Tensor) -> list[Tensor]:
        outputs = []
        for i, disc in enumerate(self.scales):
            if i > 0:
                x = self.downsample(x)
            outputs.append(disc(x))
        return outputs

    def d_loss(self, real: Tensor, fake: Tensor, r1_weight: float = 0.01) -> tuple[Tensor, Tensor]:
        """(LSGAN loss, R1 penalty) for a D step. ``fake`` is detached here: the D step must not
        push gradients into G. One D pass over ``real`` serves both terms."""
        if r1_weight > 0:
            real = real.detach().requires_grad_(True)
        real_out = self(real)
        adv = lsgan_d_loss(real_out, self(fake.detach()))
        r1 = r1_penalty(real_out, real, r1_weight) if r1_weight > 0 else adv.new_zeros(())
        return adv, r1

    def g_loss(self, fake: Tensor) -> Tensor:
        """LSGAN loss of G for its generated images (gradients flow into G)."""
        return lsgan_g_loss(self(fake))


def lsgan_d_loss(real_outputs: Sequence[Tensor], fake_outputs: Sequence[Tensor]) -> Tensor:
    """Sum over scales of mean((D(real) - 1)^2) + mean(D(fake)^2). Equals 1 per scale when D
    outputs 0 (the "D loss ~ 6" sanity value = 3 scales x 2 fake batches)."""
    total = torch.zeros((), device=real_outputs[0].device)
    for r, f in zip(real_outputs, fake_outputs, strict=True):
        total = total + ((r - 1) ** 2).mean() + (f ** 2).mean()
    return total


def lsgan_g_loss(fake_outputs: Sequence[Tensor]) -> Tensor:
    """Sum over scales of mean((D(fake) - 1)^2). The trainer applies the per-scale weight (2)."""
    total = torch.zeros((), device=fake_outputs[0].device)
    for f in fake_outputs:
        total = total + ((f - 1) ** 2).mean()
    return total


def r1_penalty(real_outputs: Sequence[Tensor], real: Tensor, weight: float = 0.01,
               create_graph: bool = True) -> Tensor:
    """R1 gradient penalty: weight * sum over scales of the batch mean of ||d D_s(real)/d real||^2.

    Gradients are taken w.r.t. the full-resolution real image (the input of D as a whole, so the
    coarser scales see it through the average pooling), one autograd call per scale so that the
    scales do not mix. ``real`` must have requires_grad=True before D was run on it.
    ``create_graph`` keeps the penalty differentiable w.r.t. D's weights (needed for training).
    """
    if not real.requires_grad:
        raise ValueError("r1_penalty: call real.requires_grad_(True) before running D on it")
    total = torch.zeros((), device=real.device)
    for out in real_outputs:
        (grad,) = torch.autograd.grad(out.sum(), real, create_graph=create_graph, retain_graph=True)
        total = total + grad.pow(2).flatten(1).sum(dim=1).mean()
    return weight * total
