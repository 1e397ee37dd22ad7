"""A small ImageNet-layout JPEG dataset, generated deterministically from a seed.

Each class is a shape family whose colour leans to a class hue (overlapping its neighbours');
everything else is a nuisance drawn per image: the exact colour, the fill texture (solid, stripes, dots), its position, scale and a small rotation, the background
(flat, gradient, noise, stripes, clutter of small distractor shapes), the image size (160-500 px
on a side, like ImageNet's) and the JPEG quality. The hue alone is a weak cue, shape
settles the rest, and random crops can cut the object: learnable in a few epochs, not trivial.
"""
from __future__ import annotations

import colorsys
import io
import json
import math
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("disc", "square", "triangle", "star", "ring", "cross", "diamond", "crescent", "chevron", "bowtie")
MIN_SIDE, MAX_SIDE = 160, 500
MAX_TILT_DEG = 15
NUM_HUES = 10  # class c's objects lean to hue c / NUM_HUES of the colour wheel ...
HUE_SPREAD = 0.07  # ... with this standard deviation (neighbouring classes are 0.1 apart)  # small enough that a tilted square never looks like the diamond class


def class_names(num_classes: int) -> list[str]:
    # WordNet-id-like folder names, sorted in class order, as in ImageNet.
    return [f"n{90000000 + c:08d}" for c in range(num_classes)]


def _polygon(shape: str, cx: float, cy: float, r: float, tilt: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        pts = [(x * 0.8, y * 0.8) for x, y in pts]
    elif shape == "diamond":
        pts = [(0, -1), (1, 0), (0, 1), (-1, 0)]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = 1.0 if k % 2 == 0 else 0.4
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((rad * math.cos(a), rad * math.sin(a)))
    elif shape == "cross":
        t = 0.3
        pts = [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t), (-t, -t)]
    elif shape == "chevron":
        pts = [(-1, -0.6), (0, 0.2), (1, -0.6), (1, 0.1), (0, 0.9), (-1, 0.1)]
    elif shape == "bowtie":
        pts = [(-1, -0.8), (0, -0.1), (1, -0.8), (1, 0.8), (0, 0.1), (-1, 0.8)]
    else:
        raise ValueError(shape)
    c, s = math.cos(tilt), math.sin(tilt)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def _shape_mask(shape: str, size: tuple[int, int], cx, cy, r, tilt) -> Image.Image:
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "disc":
        draw.ellipse(box, fill=255)
    elif shape == "ring":
        draw.ellipse(box, fill=255)
        inner = 0.55 * r
        draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    elif shape == "crescent":
        draw.ellipse(box, fill=255)
        dx, dy = 0.45 * r * math.cos(tilt), 0.45 * r * math.sin(tilt)
        draw.ellipse([cx - r + dx, cy - r + dy, cx + r + dx, cy + r + dy], fill=0)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, tilt), fill=255)
    return mask


def _random_colour(rng, avoid=None) -> np.ndarray:
    while True:
        colour = rng.integers(0, 256, 3)
        if avoid is None or np.abs(colour - avoid).sum() > 180:  # keep the shape visible
            return colour


def _texture(rng, w: int, h: int, base: np.ndarray, kind: str) -> np.ndarray:
    img = np.empty((h, w, 3), np.float32)
    img[:] = base
    if kind == "flat":
        return img
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "gradient":
        other = _random_colour(rng)
        a = rng.uniform(0, 2 * math.pi)
        t = (xx * math.cos(a) + yy * math.sin(a))
        t = (t - t.min()) / max(np.ptp(t), 1.0)
        return img * (1 - t[..., None]) + other * t[..., None]
    if kind in ("stripes", "faint-stripes"):
        other = _random_colour(rng, base)
        if kind == "faint-stripes":  # background stripes: visible, but weaker than the object's edges
            other = 0.7 * base + 0.3 * other
        a = rng.uniform(0, math.pi)
        period = rng.uniform(6, 30)
        on = (np.sin((xx * math.cos(a) + yy * math.sin(a)) * 2 * math.pi / period) > 0)
        img[on] = other
        return img
    if kind == "dots":
        other = _random_colour(rng, base)
        period = rng.uniform(8, 24)
        on = (np.sin(xx * 2 * math.pi / period) * np.sin(yy * 2 * math.pi / period)) > 0.5
        img[on] = other
        return img
    if kind == "noise":
        return img + rng.normal(0, 25, (h, w, 3))
    raise ValueError(kind)


def render(label: int, rng: np.random.Generator) -> Image.Image:
    """One image of class `label`, every nuisance drawn from `rng`."""
    w, h = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, 2))
    # The object's hue leans towards its class's own hue but overlaps its neighbours' (a weak cue
    # that a model picks up first); shape settles the rest.
    hue = (label / NUM_HUES + rng.normal(0, HUE_SPREAD)) % 1.0
    fg_colour = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.45, 1.0), rng.uniform(0.5, 1.0))) * 255
    bg_colour = _random_colour(rng, fg_colour)
    bg = _texture(rng, w, h, bg_colour, str(rng.choice(["flat", "gradient", "noise", "faint-stripes"])))
    canvas = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    # Clutter: a few small distractor shapes of any class, well below the object's scale.
    for _ in range(int(rng.integers(0, 4))):
        r = rng.uniform(0.03, 0.07) * min(w, h)
        mask = _shape_mask(str(rng.choice(SHAPES)), (w, h), rng.uniform(0, w), rng.uniform(0, h), r, rng.uniform(0, 2 * math.pi))
        canvas.paste(Image.new("RGB", (w, h), tuple(int(c) for c in _random_colour(rng))), (0, 0), mask)
    r = rng.uniform(0.22, 0.40) * min(w, h)
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    tilt = math.radians(rng.uniform(-MAX_TILT_DEG, MAX_TILT_DEG))
    mask = _shape_mask(SHAPES[label % len(SHAPES)], (w, h), cx, cy, r, tilt)
    fill = _texture(rng, w, h, fg_colour, str(rng.choice(["flat", "flat", "stripes", "dots", "gradient"])))
    canvas.paste(Image.fromarray(np.clip(fill, 0, 255).astype(np.uint8)), (0, 0), mask)
    if rng.random() < 0.3:
        canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0)))
    return canvas


def _write_one(job) -> int:
    path, label, seed_words, quality = job
    rng = np.random.default_rng(seed_words)
    buf = io.BytesIO()
    render(label, rng).save(buf, format="JPEG", quality=quality)
    Path(path).write_bytes(buf.getvalue())
    return buf.tell()


def make_dataset(root: str | Path, num_classes: int = 10, train_per_class: int = 260,
                 val_per_class: int = 50, seed: int = 0, workers: int = 2) -> dict:
    """Write root/{train,val}/<class>/*.JPEG; returns the summary also saved as root/dataset.json."""
    if num_classes > len(SHAPES):
        raise ValueError(f"num_classes {num_classes} exceeds the {len(SHAPES)} shape families")
    root = Path(root)
    jobs = []
    for split_id, (split, per_class) in enumerate((("train", train_per_class), ("val", val_per_class))):
        for label, name in enumerate(class_names(num_classes)):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                seed_words = [seed, split_id, label, i]
                quality = 75 + (seed * 7919 + split_id * 31 + label * 101 + i) % 21  # 75-95, deterministic
                jobs.append((str(folder / f"{name}_{i:05d}.JPEG"), label, seed_words, quality))
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        total_bytes = sum(pool.map(_write_one, jobs, chunksize=32))
    summary = {"classes": num_classes, "train_per_class": train_per_class, "val_per_class": val_per_class,
               "seed": seed, "files": len(jobs), "bytes": total_bytes, "shapes": list(SHAPES[:num_classes])}
    (root / "dataset.json").write_text(json.dumps(summary, indent=1))
    return summary


PHOTO_CLASSES = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "horse.png",
                 "retina.jpg", "hubble_deep_field.jpg")


def photo_crops(folder: Path, photo: Image.Image, count: int, rng: np.random.Generator, frac: tuple[float, float],
                size, quality) -> tuple[int, int]:
    """`count` random crops of `photo` (each side the fraction `frac` drawn of the photo's, at a
    random place), resized to `size(rng, crop_w, crop_h)` and saved as JPEGs of quality
    `quality(rng)`: folder/<folder name>_<i>.JPEG. Returns (files, bytes). The one generator of
    real-photo images: the photo set here and the bench corpus (bench/corpus.py)."""
    folder.mkdir(parents=True, exist_ok=True)
    w, h = photo.size
    nbytes = 0
    for i in range(count):
        f = rng.uniform(*frac)
        cw, ch = int(w * f), int(h * f)
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = photo.resize(size(rng, cw, ch), Image.BICUBIC, box=(left, top, left + cw, top + ch))
        path = folder / f"{folder.name}_{i:04d}.JPEG"
        img.save(path, "JPEG", quality=quality(rng))
        nbytes += path.stat().st_size
    return count, nbytes


def sample_photo(name: str) -> Image.Image:
    """One of scikit-image's sample photographs, RGB."""
    import skimage

    return Image.open(Path(skimage.__file__).parent / "data" / name).convert("RGB")


def make_photo_dataset(root: str | Path, train_per_class: int = 120, val_per_class: int = 30, seed: int = 0,
                       side: int = 96) -> dict:
    """A small real-photo set: class c holds random crops (10-35 % of each side, any place) of
    scikit-image's sample photograph c, saved as side x side JPEGs; train and val crops are
    drawn independently. Telling which photo a small crop comes from needs colour and texture,
    not a drawn shape."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    files = nbytes = 0
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for name in PHOTO_CLASSES:
            made, size = photo_crops(root / split / Path(name).stem, sample_photo(name), per_class, rng, (0.10, 0.35),
                                     lambda rng, cw, ch: (side, side), lambda rng: 90)
            files, nbytes = files + made, nbytes + size
    summary = {"files": files, "bytes": nbytes, "classes": len(PHOTO_CLASSES), "source": "scikit-image sample photos"}
    (root / "dataset.json").write_text(json.dumps(summary, indent=1))
    return summary
