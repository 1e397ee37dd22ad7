"""Per-image augmentation presets, applied independently to each of the M copies of one decode.

Crop parameters come from torchvision's own samplers (`RandomResizedCrop.get_params`,
`RandomCrop.get_params`), so the distributions are torchvision's. The rest is written here for
speed, because the M copies share one decode and what is left per copy must be cheap
(README, "Choices"):
- the crop boxes of all M copies are drawn *before* decoding, from the header's size, so a JPEG
  can be decoded at a reduced DCT scale (1/2, 1/4, 1/8) when every crop still has at least the
  output's pixels at that scale (no upsampling is added);
- crop + resize is one `Image.resize(box=...)` call (pillow-simd's SIMD resampler), the flip a
  `transpose`;
- copies stay uint8 HWC; float conversion, normalisation and PCA lighting noise (as per-copy
  RGB offsets drawn here) happen in the training step, on the GPU where there is one.
Randomness: copy k of file i in epoch e draws from a generator seeded by (seed, e, i, k), so a
sample does not depend on rank count, worker count or order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image

# AlexNet's PCA lighting (Krizhevsky et al. 2012): eigenvalues and eigenvectors of the RGB
# covariance of ImageNet pixels on [0, 1], as used by fb.resnet.torch and the authors' code.
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))

KINDS = ("random-resized-crop", "resize-random-crop")


def copy_seed(seed: int, epoch: int, index: int, copy: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index, copy]).generate_state(1, np.uint64)[0] >> 1)


@dataclass(frozen=True)
class TrainPreset:
    """One copy's augmentation. random-resized-crop: the Inception/ResNet crop of `scale` area and
    `ratio` aspect; resize-random-crop: the AlexNet way, resize to resize x resize, then a random
    size x size crop. Both: horizontal flip with probability `hflip`, PCA lighting noise of
    standard deviation `lighting_std` (0: off)."""

    kind: str = "random-resized-crop"
    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    resize: int = 256
    hflip: float = 0.5
    lighting_std: float = 0.0

    def draw(self, width: int, height: int, rng_seed: int) -> tuple[tuple[float, float, float, float], bool, np.ndarray]:
        """(crop box in source pixels (l, t, r, b), flip?, RGB lighting offset on [0, 1])."""
        torch.manual_seed(rng_seed)  # torchvision's samplers draw from the global torch RNG
        if self.kind == "random-resized-crop":
            top, left, h, w = T.RandomResizedCrop.get_params(_Size(width, height), list(self.scale), list(self.ratio))
            box = (left, top, left + w, top + h)
        else:  # crop of the resize x resize image, mapped back to source pixels
            top, left, h, w = T.RandomCrop.get_params(_Size(self.resize, self.resize), (self.size, self.size))
            sx, sy = width / self.resize, height / self.resize
            box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
        flip = bool(torch.rand(1).item() < self.hflip)
        offset = np.zeros(3, np.float32)
        if self.lighting_std > 0:
            alpha = torch.randn(3).numpy() * self.lighting_std
            offset = (np.array(IMAGENET_EIGVEC) @ (alpha * np.array(IMAGENET_EIGVAL))).astype(np.float32)
        return box, flip, offset


def _Size(width: int, height: int) -> torch.Tensor:
    """What torchvision's get_params needs of an image, its size, as a tensor that owns no memory."""
    return torch.empty((1, 1, 1)).expand(1, height, width)


def draft_scale(src: tuple[int, int], boxes, out: tuple[int, int]) -> int:
    """The largest JPEG DCT reduction (1, 2, 4, 8) at which every crop box still covers at
    least the output's pixels in both directions."""
    scale = 8
    for l, t, r, b in boxes:
        while scale > 1 and ((r - l) / scale < out[0] or (b - t) / scale < out[1]):
            scale //= 2
    return scale


def decode_rgb(img: Image.Image, scale: int) -> tuple[Image.Image, float, float]:
    """Decode (at 1/scale for JPEGs) to RGB; returns the image and its x/y factor to source pixels."""
    width, height = img.size
    if scale > 1 and img.format == "JPEG":
        img.draft("RGB", (math.ceil(width / scale), math.ceil(height / scale)))
    img = img.convert("RGB")
    return img, img.size[0] / width, img.size[1] / height


def make_copies(img: Image.Image, preset: TrainPreset, seeds: list[int]) -> tuple[list[np.ndarray], np.ndarray]:
    """Decode `img` once and make one uint8 HWC array per seed; returns (copies, lighting [M, 3])."""
    width, height = img.size
    draws = [preset.draw(width, height, s) for s in seeds]
    out = (preset.size, preset.size)
    img, fx, fy = decode_rgb(img, draft_scale((width, height), [d[0] for d in draws], out))
    copies = []
    for (l, t, r, b), flip, _ in draws:
        crop = img.resize(out, Image.BILINEAR, box=(l * fx, t * fy, r * fx, b * fy))
        if flip:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        copies.append(np.asarray(crop))
    return copies, np.stack([d[2] for d in draws])


def eval_image(img: Image.Image, resize: int, crop: int) -> np.ndarray:
    """Resize the short side to `resize`, centre-crop `crop` x `crop`; uint8 HWC."""
    width, height = img.size
    short = min(width, height)
    scale = 1
    while scale < 8 and short / (scale * 2) >= resize:
        scale *= 2
    img, _, _ = decode_rgb(img, scale)
    w, h = img.size
    ratio = resize / min(w, h)
    new_w, new_h = max(resize, round(w * ratio)), max(resize, round(h * ratio))
    # centre crop in resized pixels, mapped back to the decoded image
    left, top = (new_w - crop) // 2, (new_h - crop) // 2
    box = (left / ratio, top / ratio, (left + crop) / ratio, (top + crop) / ratio)
    return np.asarray(img.resize((crop, crop), Image.BILINEAR, box=box))
