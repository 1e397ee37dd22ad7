"""A training batch -> the model's input, the one normaliser of training, analysis and benches.

The loader hands over uint8 copies (augment.where=loader) or decoded canvases with the crop boxes
(augment.where=device, data/copies_on_device.py); here they become float NCHW on the device,
plus the PCA lighting offset of each copy, minus the mean, over the std, in the memory layout the
model wants. Done on the training device, not in the loader workers, so that a GPU does the float
work (and, with augment.where=device, the crops themselves).
"""
from __future__ import annotations

import torch

from hvd_ba.data.copies_on_device import device_crops


def channel_stats(augment, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """augment.mean and augment.std as [1, 3, 1, 1] tensors on `device`."""
    return (torch.tensor(augment.mean, device=device).view(1, 3, 1, 1),
            torch.tensor(augment.std, device=device).view(1, 3, 1, 1))


def unit_pixels(batch: dict, device: torch.device) -> torch.Tensor:
    """A training batch's samples as float NCHW on [0, 1] on `device`: the loader's uint8 copies
    converted, or (device augmentation) the crops made here from its canvases."""
    if "canvas" in batch:
        return device_crops(batch["canvas"].to(device, non_blocking=True), batch["boxes"], batch["owner"],
                            batch["flips"], batch["size"])
    return batch["images"].to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)


def normalize(batch: dict, device: torch.device, mean: torch.Tensor, std: torch.Tensor,
              channels_last: bool = False) -> torch.Tensor:
    """uint8 HWC [N, H, W, 3] (or canvases + crop boxes) + lighting offsets -> normalised float
    NCHW (channels_last if asked)."""
    x = unit_pixels(batch, device)
    x = x.add_(batch["lighting"].to(device, non_blocking=True).view(-1, 3, 1, 1))
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return x.sub_(mean).div_(std).contiguous(memory_format=layout)
