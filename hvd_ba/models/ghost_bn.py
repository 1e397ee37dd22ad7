"""Ghost batch norm: BN statistics over groups of `model.ghost_size` samples (64 in the paper),
rank-local (never synchronised across ranks). Both ways to get them live here:

- split (model.ghost_impl=split): `GhostBatchNorm2d` replaces every BatchNorm2d and normalises
  each consecutive group of ghost_size samples of one forward pass on its own;
- accumulate (model.ghost_impl=accumulate, the authors' way, for memory): the rank's M*B samples
  go through one forward/backward pass per ghost group (config.derive: forward_passes; `ghost_chunks`),
  plain BN then seeing one group per pass, and the gradients are allreduced once after the last
  (Horovod's backward_passes_per_step; train/engine.py: train_step).

The samples of a batch are laid out so that a group holds what the paper's groups hold
(data.layout, data/copies.py: BACollate).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hvd_ba.config import PAPER_GHOST_SIZE


class GhostBatchNorm2d(nn.BatchNorm2d):
    """Batch norm whose training statistics are taken over consecutive groups of `ghost_size`.

    Each group is normalised as if it were its own forward pass, and the running statistics are
    updated once per group, exactly as the authors' chunked forward (several passes with gradient
    accumulation) does. Rank-local: nothing is synchronised across Horovod ranks. In eval mode it
    is a plain BatchNorm2d over the running statistics.
    """

    def __init__(self, num_features: int, ghost_size: int = PAPER_GHOST_SIZE, **kwargs):
        super().__init__(num_features, **kwargs)
        self.ghost_size = ghost_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.shape[0] <= self.ghost_size:
            return super().forward(x)
        if x.shape[0] % self.ghost_size:
            raise ValueError(
                f"GhostBatchNorm2d: {x.shape[0]} samples are not a multiple of ghost_size {self.ghost_size}"
            )
        if self.momentum is None:
            raise ValueError("GhostBatchNorm2d needs a fixed momentum (cumulative averaging is not supported)")
        groups = x.split(self.ghost_size)
        if self.track_running_stats:
            self.num_batches_tracked.add_(len(groups))  # one forward pass per group
        return torch.cat([
            F.batch_norm(g, self.running_mean, self.running_var, self.weight, self.bias, True, self.momentum, self.eps)
            for g in groups
        ])

    def extra_repr(self) -> str:
        return super().extra_repr() + f", ghost_size={self.ghost_size}"


def use_ghost_batch_norm(model: nn.Module, ghost_size: int) -> nn.Module:
    """Replace every BatchNorm2d in `model` by a GhostBatchNorm2d that shares its tensors."""
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            ghost = GhostBatchNorm2d(child.num_features, ghost_size, eps=child.eps, momentum=child.momentum,
                                     affine=child.affine, track_running_stats=child.track_running_stats)
            ghost.load_state_dict(child.state_dict())
            setattr(model, name, ghost)
        else:
            use_ghost_batch_norm(child, ghost_size)
    return model


def ghost_chunks(x: torch.Tensor, labels: torch.Tensor, passes: int):
    """The (inputs, labels) of each forward pass of a step: consecutive groups, in batch order."""
    return zip(x.chunk(passes), labels.chunk(passes))
