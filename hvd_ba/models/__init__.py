"""The networks (torchvision's, and two small ones for CPU runs) and ghost batch norm."""
from hvd_ba.models.ghost_bn import GhostBatchNorm2d, ghost_chunks, use_ghost_batch_norm  # noqa: F401
from hvd_ba.models.nets import build_model, parameter_groups  # noqa: F401
