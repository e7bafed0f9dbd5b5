"""Losses for refiner training: masked reconstruction, hinge GAN, feature matching.

Images are [N, 3, H, W] in [0, 1]; weights are [N, 1, H, W] in [0, 1] (the
sample format's per-pixel "weight", views flattened into N). Every masked loss
is normalised PER ITEM and then averaged over items,

    L = 1/N sum_i  sum_p w_ip e_ip / (C sum_p w_ip + eps),

so a batch split over ranks or accumulation steps gives the same gradient as
the whole batch at once (the trainer relies on this), and the head region of a
small head counts as much as that of a big one.

Two kinds of feature matching: in the discriminator's feature space (pix2pixHD,
Wang et al. 2018: mid-level statistics of output and target as the
discriminator learns them), and in a pretrained face prior that loads offline,
dlib's face-recognition ResNet (models.face.identity): an identity loss on its
128-d descriptors and a face-specific perceptual loss on its activations.
(LPIPS and ArcFace need weights that cannot be obtained offline.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from models.face.identity import align_faces
from models.face.identity_net import FaceRecognitionNet

EPS = 1e-6


def _check(pred: Tensor, target: Tensor, weight: Tensor | None) -> None:
    if pred.ndim != 4 or pred.shape != target.shape:
        raise ValueError(f"expected pred and target [N, C, H, W] of one shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    if weight is not None and tuple(weight.shape) != (pred.shape[0], 1, *pred.shape[2:]):
        raise ValueError(f"expected weight [N, 1, H, W] = {(pred.shape[0], 1, *pred.shape[2:])}, got {tuple(weight.shape)}")


def weighted_mean(err: Tensor, weight: Tensor | None) -> Tensor:
    """err [N, C, H, W], weight [N, 1, H, W] or None -> scalar, the per-item weighted mean averaged over items."""
    if weight is None:
        return err.mean()
    num = (err * weight).flatten(1).sum(1)  # [N]
    den = weight.flatten(1).sum(1) * err.shape[1] + EPS  # [N]
    return (num / den).mean()


def masked_l2(pred: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Weighted mean squared error (see module docstring). pred, target [N, C, H, W]."""
    _check(pred, target, weight)
    return weighted_mean((pred - target).square(), weight)


def masked_psnr(pred: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """PSNR in dB of each item inside its weight, [N]; images in [0, 1]."""
    _check(pred, target, weight)
    err = (pred - target).square()
    if weight is None:
        mse = err.flatten(1).mean(1)
    else:
        mse = (err * weight).flatten(1).sum(1) / (weight.flatten(1).sum(1) * err.shape[1] + EPS)
    return -10 * torch.log10(mse.clamp(min=1e-10))


def _gaussian_window(size: int, sigma: float, channels: int, like: Tensor) -> tuple[Tensor, Tensor]:
    t = torch.arange(size, dtype=like.dtype, device=like.device) - (size - 1) / 2
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    return k.view(1, 1, 1, -1).expand(channels, 1, 1, -1), k.view(1, 1, -1, 1).expand(channels, 1, -1, 1)


def ssim_map(pred: Tensor, target: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Per-pixel SSIM [N, C, H, W] (Wang et al. 2004) of images in [0, 1].

    Gaussian window (11, sigma 1.5), reflect padding so the map is the
    image's size (it is weighted per pixel), C1 = 0.01^2, C2 = 0.03^2:

        SSIM = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))
    """
    _check(pred, target, None)
    c = pred.shape[1]
    pad = window // 2
    if min(pred.shape[-2:]) <= pad:
        raise ValueError(f"expected images larger than {pad} pixels for an SSIM window of {window}, got {tuple(pred.shape[-2:])}")
    dtype = torch.promote_types(pred.dtype, torch.float32)  # at least float32 (bf16 outputs are upcast)
    x, y = pred.to(dtype), target.to(dtype)
    kx, ky = _gaussian_window(window, sigma, c, x)

    def blur(x: Tensor) -> Tensor:
        x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        return F.conv2d(F.conv2d(x, kx, groups=c), ky, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x.square()
    syy = blur(y * y) - mu_y.square()
    sxy = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    return ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x.square() + mu_y.square() + c1) * (sxx + syy + c2))


def masked_ssim_loss(pred: Tensor, target: Tensor, weight: Tensor | None = None, window: int = 11) -> Tensor:
    """Weighted mean of (1 - SSIM) / 2 per pixel: 0 for identical images, at most 1."""
    _check(pred, target, weight)
    return weighted_mean((1 - ssim_map(pred, target, window)) / 2, weight)


# ---- adversarial ----------------------------------------------------------------------------------
def _pooled(weight: Tensor | None, like: Tensor) -> Tensor | None:
    """Weight map [N, 1, H, W] area-averaged to a logit/feature map's size [N, 1, h, w]."""
    if weight is None:
        return None
    return F.adaptive_avg_pool2d(weight.to(like.dtype), like.shape[-2:])


def d_hinge_loss(real_logits: list[Tensor], fake_logits: list[Tensor], weight: Tensor | None = None) -> Tensor:
    """Discriminator hinge loss (Lim & Ye 2017; SAGAN), averaged over scales:

        L_D = E[max(0, 1 - D(real))] + E[max(0, 1 + D(fake))]

    logits: one [N, 1, h_k, w_k] patch map per scale; weight [N, 1, H, W] weights
    the patches (pooled to each map), so the GAN looks where the losses look.
    """
    if len(real_logits) != len(fake_logits) or not real_logits:
        raise ValueError(f"expected as many real as fake logit maps (>= 1), got {len(real_logits)} and {len(fake_logits)}")
    total = 0.0
    for real, fake in zip(real_logits, fake_logits):
        total = total + weighted_mean(F.relu(1 - real), _pooled(weight, real)) + weighted_mean(F.relu(1 + fake), _pooled(weight, fake))
    return total / len(real_logits)


def g_hinge_loss(fake_logits: list[Tensor], weight: Tensor | None = None) -> Tensor:
    """Generator hinge loss L_G = -E[D(fake)], averaged over scales (weights as in d_hinge_loss)."""
    if not fake_logits:
        raise ValueError("expected at least one logit map, got none")
    return sum(weighted_mean(-fake, _pooled(weight, fake)) for fake in fake_logits) / len(fake_logits)


def feature_matching_loss(fake_features: list[list[Tensor]], real_features: list[list[Tensor]], weight: Tensor | None = None) -> Tensor:
    """L1 between discriminator features of output and target (pix2pixHD), averaged
    over layers and scales; real features are treated as constants.

    features: per scale, a list of [N, C_l, h_l, w_l] activations.
    """
    if len(fake_features) != len(real_features) or not fake_features:
        raise ValueError(f"expected features of as many scales (>= 1), got {len(fake_features)} and {len(real_features)}")
    terms = []
    for fakes, reals in zip(fake_features, real_features):
        for f, r in zip(fakes, reals):
            terms.append(weighted_mean((f - r.detach()).abs(), _pooled(weight, f)))
    return sum(terms) / len(terms)


# ---- face prior (dlib's face-recognition ResNet) --------------------------------------------------
AVATAR_FIVE_POINTS = ((0.5958, 0.4365), (0.5391, 0.4394), (0.3995, 0.4348), (0.4544, 0.4389), (0.4934, 0.5498))
"""dlib's 5 points (models.face.identity) in a frontal avatar crop, in crop sides: the mean over the 19
frontal faces of the test pictures (|yaw| < 15 degrees), spread about 1 % of the side."""


def face_prior_losses(
    net: FaceRecognitionNet,
    pred: Tensor,  # [N, 3, S, S] in [0, 1]
    target: Tensor,  # [N, 3, S, S] in [0, 1]
    points: Tensor | None = None,  # [N, 5, 2] px of the target's face, or the frontal avatar crop's
) -> tuple[Tensor, Tensor]:
    """(identity, features) losses of dlib's face network on the face chips of pred and target.

    Both pictures are cut with the TARGET's 5 points (dlib's 150 px chip; by
    default where a frontal avatar crop has them, :data:`AVATAR_FIVE_POINTS`),
    the target's side without gradient:

        identity = 1/N sum_i sqrt(|| e(pred_i) - e(target_i) ||^2 + 1e-8)   (dlib units: 0.6 = another person)
        features = 1/L sum_l mean | phi_l(pred) - phi_l(target) |            (stem and the 5 levels' activations)

    Computed in float32 whatever the inputs' dtype.
    """
    _check(pred, target, None)
    N, _, H, W = pred.shape
    if points is None:
        points = torch.tensor(AVATAR_FIVE_POINTS, device=pred.device, dtype=torch.float64) * torch.tensor(
            [W, H], device=pred.device, dtype=torch.float64)
        points = points.expand(N, 5, 2)
    with torch.no_grad():
        real_acts, real_desc = net.features(align_faces(target.float(), points))
    fake_acts, fake_desc = net.features(align_faces(pred.float(), points))
    identity = ((fake_desc - real_desc).square().sum(1) + 1e-8).sqrt().mean()
    features = sum((f - r).abs().mean() for f, r in zip(fake_acts, real_acts)) / len(fake_acts)
    return identity, features


def identity_loss(net: FaceRecognitionNet, pred: Tensor, target: Tensor, points: Tensor | None = None) -> Tensor:
    """Mean dlib descriptor distance between pred and target faces (see :func:`face_prior_losses`)."""
    return face_prior_losses(net, pred, target, points)[0]


def face_feature_loss(net: FaceRecognitionNet, pred: Tensor, target: Tensor, points: Tensor | None = None) -> Tensor:
    """Feature matching in dlib's face network (a face-specific perceptual loss, see :func:`face_prior_losses`)."""
    return face_prior_losses(net, pred, target, points)[1]
