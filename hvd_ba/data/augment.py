"""Per-copy augmentation presets (the draws of each of the M copies) and the one decode of an image.

Crop parameters follow torchvision's `RandomResizedCrop.get_params` algorithm (re-implemented
over a numpy generator; a test checks its statistics against torchvision's). The rest is written
here for speed, because the M copies share one decode and what is left per copy must be cheap
(README, "Choices"):
- the crop boxes of all M copies are drawn *before* decoding, from the header's size, so a JPEG
  can be decoded at a reduced DCT scale (1/2, 1/4, 1/8) when every crop still has at least the
  output's pixels at that scale (no upsampling is added);
- crop + resize is one `Image.resize(box=...)` call (pillow-simd's SIMD resampler), the flip a
  `transpose`;
- copies stay uint8 HWC; float conversion, normalisation and PCA lighting noise (as per-copy
  RGB offsets drawn here) happen in the training step, on the GPU where there is one.
Randomness: the copies of file i in epoch e draw in turn from a generator seeded by (seed, e, i),
so copy k is fixed by (seed, epoch, file index, k) whatever the rank count, worker count or
order. The file index names the sample across ranks, so the rank is deliberately not a seed word:
a run resumed on another number of ranks sees the same copies of each file.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

# AlexNet's PCA lighting (Krizhevsky et al. 2012): eigenvalues and eigenvectors of the RGB
# covariance of ImageNet pixels on [0, 1], as used by fb.resnet.torch and the authors' code.
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))

KINDS = ("random-resized-crop", "short-side-random-crop", "resize-random-crop")


def image_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one image in one epoch; its copies draw from it in turn (copy 0 first)."""
    return np.random.default_rng([seed, epoch, index])


def random_resized_crop_params(rng: np.random.Generator, width: int, height: int, scale, ratio) -> tuple[int, int, int, int]:
    """(top, left, h, w): torchvision's RandomResizedCrop.get_params, drawn from `rng`.

    The same algorithm (10 tries of a uniform area fraction and a log-uniform aspect, then a
    central crop clamped to the ratio range); a test checks the statistics against torchvision's.
    It is re-implemented because torchvision draws from the global torch RNG, and re-seeding that
    for every copy cost more than the crop itself.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass(frozen=True)
class TrainPreset:
    """One copy's augmentation. random-resized-crop: the Inception/ResNet crop of `scale` area and
    `ratio` aspect; short-side-random-crop: Krizhevsky et al.'s AlexNet way, the shorter side
    rescaled to `resize`, the central resize x resize patch, then a random size x size crop of it
    (torchvision's Resize(resize) + CenterCrop(resize) + crop, same rounding); resize-random-crop:
    resize to resize x resize (aspect ratio not kept), then a random size x size crop. All:
    horizontal flip with probability `hflip`, PCA lighting noise of standard deviation
    `lighting_std` (0: off).

    Every kind returns its crop as a box in source pixels: the rescale and the centre patch are a
    mapping computed once per decoded image, and each copy is one resample of the decoded image
    over its box, which gives the pixels of resizing first and cropping after (PIL's resampler
    places and sizes its filter by the box), without an intermediate image."""

    kind: str = "random-resized-crop"
    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    resize: int = 256
    hflip: float = 0.5
    lighting_std: float = 0.0

    def draw(self, width: int, height: int, rng: np.random.Generator) -> tuple[tuple[float, float, float, float], bool, np.ndarray]:
        """(crop box in source pixels (l, t, r, b), flip?, RGB lighting offset on [0, 1])."""
        if self.kind == "random-resized-crop":
            top, left, h, w = random_resized_crop_params(rng, width, height, self.scale, self.ratio)
            box = (left, top, left + w, top + h)
        elif self.kind == "short-side-random-crop":
            # torchvision: Resize(resize) keeps the aspect (long side truncated), CenterCrop rounds
            short, long = min(width, height), max(width, height)
            new_long = int(self.resize * long / short)
            new_w, new_h = (self.resize, new_long) if width <= height else (new_long, self.resize)
            centre_top = int(round((new_h - self.resize) / 2.0))
            centre_left = int(round((new_w - self.resize) / 2.0))
            top, left = (int(v) for v in rng.integers(0, self.resize - self.size + 1, 2))
            sx, sy = width / new_w, height / new_h
            top, left = top + centre_top, left + centre_left
            box = (left * sx, top * sy, (left + self.size) * sx, (top + self.size) * sy)
        else:  # a size x size crop of the resize x resize image, mapped back to source pixels
            top, left = (int(v) for v in rng.integers(0, self.resize - self.size + 1, 2))
            sx, sy = width / self.resize, height / self.resize
            box = (left * sx, top * sy, (left + self.size) * sx, (top + self.size) * sy)
        flip = bool(rng.random() < self.hflip)
        offset = np.zeros(3, np.float32)
        if self.lighting_std > 0:
            alpha = rng.normal(0.0, self.lighting_std, 3)
            offset = (np.array(IMAGENET_EIGVEC) @ (alpha * np.array(IMAGENET_EIGVAL))).astype(np.float32)
        return box, flip, offset


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
    img.load()
    if img.mode != "RGB":  # convert() copies even when the mode is already right
        img = img.convert("RGB")
    return img, img.size[0] / width, img.size[1] / height


def decode_once(img: Image.Image, preset: TrainPreset, copies: int, rng: np.random.Generator):
    """Draw the M copies' crop boxes, flips and lighting from `rng` (copy 0 first), from the
    header's size alone, then decode `img` once at the largest JPEG DCT scale that every box
    allows. Returns (decoded RGB image, x and y factor from source to decoded pixels, draws).
    The one draw-and-decode of both copy paths (data/copies.py, data/copies_on_device.py): they
    see the same draws by construction."""
    width, height = img.size
    draws = [preset.draw(width, height, rng) for _ in range(copies)]
    decoded, fx, fy = decode_rgb(img, draft_scale((width, height), [d[0] for d in draws], (preset.size, preset.size)))
    return decoded, fx, fy, draws


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
