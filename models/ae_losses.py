"""The modules behind ae15.py's loss, and its metrics. `Reconstruct` is the training forward that
DDP wraps: encode once, decode every channel prefix c' (DC-AE 1.5, arXiv 2508.00413: channel-prefix
masking), plus the KL term of a KL VAE. LPIPS v0.1 with the VGG16 trunk (Zhang et al. 2018; frozen,
loaded from local files) and a PatchGAN discriminator (Isola et al. 2017, pix2pix; trained from
scratch) make the perceptual and hinge-GAN terms; PSNR and SSIM score held-out reconstructions.

The architectures are fixed (LPIPS must match the released weights; the PatchGAN is pix2pix's), so
there are no presets; the tests run them at 32 px. Module names are checkpoint keys: LPIPS reads
torchvision's `features.{i}.weight`, and ae15.py saves the discriminator as `disc` with
nn.Sequential's `{i}.weight`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.vae import VAE

# ----------------------------------------------------------------------------------------------------------------
# the training forward: one encoding, K decoded channel prefixes


class Reconstruct(nn.Module):
    """The training forward that DDP wraps: encode once, decode every channel prefix (DC-AE 1.5's
    channel masking)."""

    def __init__(self, ae: nn.Module):
        super().__init__()
        self.ae = ae

    def forward(
        self, x: torch.Tensor, prefixes: list[int]
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        if isinstance(self.ae, VAE):  # KL VAE: reparameterised posterior sample, KL to N(0, I)
            mean, logvar = self.ae.posterior(x)  # (B, C, h, w) each, raw units
            p = self.ae.params
            z = (
                mean + torch.randn_like(mean) * (0.5 * logvar).exp() - p.shift_factor
            ) * p.scaling_factor
            kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        else:
            z = self.ae.encode(x)  # (B, C, h, w)
            kl = x.new_zeros(())
        # zeroing channels >= c == slicing them off
        return [self.ae.decode(z[:, :c]) for c in prefixes], kl


# ----------------------------------------------------------------------------------------------------------------
# LPIPS: the perceptual distance


class LPIPS(nn.Module):
    """LPIPS v0.1 with the VGG16 trunk (Zhang et al. 2018): unit-normalised features at 5 depths,
    squared differences weighted by 1x1 convs, averaged over space, summed. Weights come from local
    files only."""

    VGG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
    # torchvision vgg16.features indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
    TAPS = (3, 8, 15, 22, 29)

    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for v in self.VGG:
            layers += [nn.MaxPool2d(2)] if v == "M" else [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
            c = c if v == "M" else v
        self.features = nn.Sequential(*layers)  # torchvision's key names: features.{i}.weight
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in (64, 128, 256, 512, 512))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[:, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[:, None, None])

    @classmethod
    def load(cls, folder: str | Path) -> LPIPS:
        """The frozen LPIPS from `folder`: torchvision's vgg16-397923af.pth, lpips' v0.1 vgg.pth."""
        vgg, lin = Path(folder) / "vgg16-397923af.pth", Path(folder) / "vgg.pth"
        if not (vgg.is_file() and lin.is_file()):
            raise FileNotFoundError(
                f"--lpips_path {folder} must hold {vgg.name} (torchvision) and {lin.name} (lpips)"
            )
        vgg_sd = torch.load(vgg, map_location="cpu", weights_only=True)  # no pickled code
        lin_sd = torch.load(lin, map_location="cpu", weights_only=True)
        sd = {k: v for k, v in vgg_sd.items() if k.startswith("features.")}
        sd.update({f"lins.{k[3]}.weight": v for k, v in lin_sd.items()})  # lin{k}.model.1.weight
        model = cls()
        model.load_state_dict({**sd, "shift": model.shift, "scale": model.scale}, strict=True)
        return model.eval().requires_grad_(False)

    # images in [-1, 1] -> (B,)
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = (torch.cat([x, y]) - self.shift) / self.scale
        total = 0.0
        for i, layer in enumerate(self.features[: self.TAPS[-1] + 1]):
            h = layer(h)
            if i in self.TAPS:
                fx, fy = (h / (h.norm(dim=1, keepdim=True) + 1e-10)).chunk(2)
                total = total + self.lins[self.TAPS.index(i)]((fx - fy).pow(2)).mean((1, 2, 3))
        return total


# ----------------------------------------------------------------------------------------------------------------
# PatchGAN: the discriminator


def patch_discriminator(width: int = 64) -> nn.Module:
    """PatchGAN (pix2pix): one real/fake logit per ~70 px patch. Trained from scratch, so no weights
    are needed."""
    block = lambda a, b: [nn.Conv2d(a, b, 4, 2, 1), nn.GroupNorm(8, b), nn.LeakyReLU(0.2)]
    layers = [
        nn.Conv2d(3, width, 4, 2, 1),
        nn.LeakyReLU(0.2),
        *block(width, 2 * width),
        *block(2 * width, 4 * width),
    ]
    return nn.Sequential(*layers, nn.Conv2d(4 * width, 1, 4, 1, 1))


# ----------------------------------------------------------------------------------------------------------------
# metrics: PSNR and SSIM on 8-bit images


def quantize(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> 8-bit levels in [0, 1], as a saved PNG would hold them."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round() / 255


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # (B,) in dB, on 8-bit [0, 1] images
    return 10 * torch.log10(1 / (quantize(x) - quantize(y)).pow(2).mean((1, 2, 3)).clamp_min(1e-10))


# (B,): Gaussian window 11, sigma 1.5 (Wang et al. 2004)
def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x, y = quantize(x), quantize(y)
    g = torch.exp(-((torch.arange(11, dtype=torch.float32) - 5) ** 2) / (2 * 1.5**2))
    w = (g[:, None] * g[None, :] / g.sum() ** 2).expand(3, 1, 11, 11).to(x.device)
    blur = lambda t: F.conv2d(t, w, groups=3)  # valid window, per channel
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.mean((1, 2, 3))
