"""The benches' photo corpus: real photographs (scikit-image's sample photos) cut and re-encoded
to ImageNet-like sizes and JPEG qualities, in the ImageNet folder layout; and a training loader
over it, built from the resnet50 recipe (loader_config) as training builds its own.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from hvd_ba.config import Config, ConfigError, from_dict
from hvd_ba.data.synthetic import photo_crops, sample_photo

CORPUS_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png",
                 "motorcycle_left.png", "motorcycle_right.png", "retina.jpg", "rocket.jpg")
IMAGENET_SIDES = (500, 375)  # the most common ImageNet training image size
DEFAULT_CORPUS = "~/.cache/hvd_ba/bench-photos"


def make_photo_corpus(root: Path, per_photo: int = 60, seed: int = 0) -> Path:
    """root/train/<photo>/*.JPEG: random crops (half to all of each side) of each sample photo at
    ImageNet-like sizes (about 500 x 375, +-10 %) and JPEG qualities (85-95)."""
    rng = np.random.default_rng(seed)

    def size(rng, cw, ch):
        long_side, short_side = (int(s * rng.uniform(0.9, 1.1)) for s in IMAGENET_SIDES)
        return (long_side, short_side) if cw >= ch else (short_side, long_side)

    for name in CORPUS_PHOTOS:
        photo_crops(root / "train" / Path(name).stem, sample_photo(name), per_photo, rng, (0.5, 1.0), size,
                    lambda rng: int(rng.integers(85, 96)))
    return root


def corpus(path: str, images: int) -> Path:
    """The bench photo corpus, grown to at least `images` files."""
    root = Path(os.path.expanduser(path))
    for folder in (root, root / "train"):
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"--corpus '{path}': {folder} is a file, not a folder")
    if len(list((root / "train").rglob("*.JPEG"))) < images:
        print(f"bench: making the photo corpus in {root} ...", flush=True)
        make_photo_corpus(root, per_photo=-(-images // len(CORPUS_PHOTOS)))
    return root


def loader_config(root: Path, copies: int, unique: int, size: int, workers: int, where: str, steps: int) -> Config:
    """The resnet50 recipe for a bench loader over `root`: config.py's defaults, which the resnet50
    preset keeps but for the batch and the ghost size set here. From the dataclasses, not the
    preset file: the GPU check runs the benches without PyYAML."""
    return from_dict({"data": {"path": str(root), "manifest_dir": None, "copies": copies, "unique_batch": unique,
                               "workers": workers},
                      "augment": {"size": size, "where": where}, "model": {"arch": "resnet50", "ghost_size": None},
                      "run": {"max_steps_per_epoch": steps}})


def loader_for(root: Path, copies: int, unique: int, size: int, workers: int, where: str, steps: int,
               rank: int = 0, world: int = 1):
    from hvd_ba.data.manifest import load_index
    from hvd_ba.data.pipeline import make_train_loader

    cfg = loader_config(root, copies, unique, size, workers, where, steps)
    return make_train_loader(load_index(root, "train", None), cfg, rank, world), cfg
