"""The M copies made on the training device (augment.where: device).

The loader worker reads and decodes each image once (at the JPEG DCT scale the CPU path would
use), bounds it to `augment.canvas` px on its long side, and sends that one decoded image with
the M crop boxes and flips, drawn by the very same `TrainPreset.draw` calls as the CPU path (same
generator, same order: the distributions are the CPU presets' by construction, and a test checks
their statistics against torchvision's). The worker makes no per-copy pixels, so its cost per
sample is decode / M.

On the device, all M*B crops of a batch are one `torchvision.ops.roi_align` call: each output
pixel is the mean of bilinear samples spread over its bin (sampling_ratio=-1: ceil(box / size)
per axis), which is the area-weighted downscale that PIL's BILINEAR `resize(box=...)` does on the
CPU path; the flips are one `torch.where`. Then lighting and normalisation as usual.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from hvd_ba.data.augment import TrainPreset, decode_once


def canvas_copies(img: Image.Image, preset: TrainPreset, copies: int, rng: np.random.Generator,
                  canvas: int) -> dict:
    """Decode `img` once; return it (uint8 HWC, long side <= canvas) with the M crop boxes in its
    pixels, the flips and the lighting offsets. Draws and decodes as `copies.make_copies` (augment.decode_once)."""
    img, fx, fy, draws = decode_once(img, preset, copies, rng)
    w, h = img.size
    if max(w, h) > canvas:
        s = canvas / max(w, h)
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR, reducing_gap=3.0)
        fx, fy = fx * img.size[0] / w, fy * img.size[1] / h
    boxes = np.array([(l * fx, t * fy, r * fx, b * fy) for (l, t, r, b), _, _ in draws], np.float32)
    return {"canvas": np.asarray(img), "size": preset.size, "boxes": boxes, "flips": np.array([d[1] for d in draws]),
            "lighting": np.stack([d[2] for d in draws])}


def collate_canvases(items: list[dict], copy_major: bool, canvas: torch.Tensor) -> dict:
    """B decoded images written into `canvas`, a zeroed uint8 [B, H, W, 3] (H, W: the batch's
    largest), and per sample (M*B, in the layout's order): the box [l, t, r, b], the owning image,
    the flip."""
    b, m = len(items), len(items[0]["boxes"])
    for i, it in enumerate(items):
        h, w = it["canvas"].shape[:2]
        canvas[i, :h, :w].numpy()[:] = it["canvas"]
    boxes = torch.from_numpy(np.stack([it["boxes"] for it in items]))  # [B, M, 4]
    flips = torch.from_numpy(np.stack([it["flips"] for it in items]))  # [B, M]
    owner = torch.arange(b).view(b, 1).expand(b, m)
    if copy_major:
        boxes, flips, owner = boxes.transpose(0, 1), flips.transpose(0, 1), owner.transpose(0, 1)
    return {"canvas": canvas, "size": items[0]["size"], "boxes": boxes.reshape(m * b, 4), "flips": flips.reshape(m * b),
            "owner": owner.reshape(m * b)}


def device_crops(canvas: torch.Tensor, boxes: torch.Tensor, owner: torch.Tensor, flips: torch.Tensor,
                 size: int) -> torch.Tensor:
    """uint8 [B, H, W, 3] canvases (on the device) -> float [M*B, 3, size, size] on [0, 1]: every
    crop resized to size x size in one roi_align call, then flipped where asked."""
    from torchvision.ops import roi_align

    device = canvas.device
    x = canvas.permute(0, 3, 1, 2).float()
    # Boxes, owners and flips come pinned from the loader (pin_memory): copied without blocking.
    owner = owner.to(device, non_blocking=True).to(torch.float32)
    boxes = boxes.to(device, non_blocking=True).to(torch.float32)
    rois = torch.cat([owner.view(-1, 1), boxes], 1)
    crops = roi_align(x, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    crops = torch.where(flips.to(device, non_blocking=True).view(-1, 1, 1, 1), crops.flip(-1), crops)
    return crops.div_(255)
