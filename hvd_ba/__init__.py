"""hvd_ba: Batch Augmentation on Horovod."""

__version__ = "0.1.0"
