"""The bad-input sweep: 100 odd files mixed into a real dataset. Supported ones (PNG, CMYK and
greyscale JPEGs, a PNG named .JPEG) decode to the right pixels; broken ones (truncated, empty,
text) are counted and replaced; nothing crashes."""
import io
import shutil

import pytest

import numpy as np
import torch
from PIL import Image

from hvd_ba.config import load_config
from hvd_ba.data.manifest import load_index
from hvd_ba.data.pipeline import make_train_loader

pytestmark = pytest.mark.unit

COLOUR = (200, 40, 90)  # a solid colour: every crop of a supported file must show it


def jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def write_odd_files(folder, rng) -> dict:
    """100 files in one class folder; returns {file name: expected RGB or None for broken}."""
    folder.mkdir(parents=True, exist_ok=True)
    good = jpeg(Image.new("RGB", (300, 240), COLOUR))
    cases = {}
    for i in range(20):  # truncated at 20-80 % of the bytes
        cut = int(len(good) * rng.uniform(0.2, 0.8))
        cases[f"truncated_{i}.JPEG"] = (good[:cut], None)
    for i in range(15):
        cases[f"empty_{i}.JPEG"] = (b"", None)
    for i in range(15):
        cases[f"text_{i}.JPEG"] = (f"not an image {i}\n".encode() * 20, None)
    png = io.BytesIO()
    Image.new("RGB", (260, 200), COLOUR).save(png, "PNG")
    for i in range(10):
        cases[f"photo_{i}.png"] = (png.getvalue(), COLOUR)
    for i in range(5):
        cases[f"png_named_{i}.JPEG"] = (png.getvalue(), COLOUR)
    cmyk = Image.new("RGB", (280, 220), COLOUR).convert("CMYK")
    for i in range(15):
        cases[f"cmyk_{i}.JPEG"] = (jpeg(cmyk), COLOUR)
    grey = Image.new("L", (320, 240), 128)
    for i in range(20):
        cases[f"grey_{i}.JPEG"] = (jpeg(grey), (128, 128, 128))
    assert len(cases) == 100
    for name, (data, _) in cases.items():
        (folder / name).write_bytes(data)
    return {name: expected for name, (_, expected) in cases.items()}


def test_hundred_odd_files_in_a_real_dataset(small_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    expected = write_odd_files(data / "train" / "n90000002", np.random.default_rng(0))
    index = load_index(data, "train", None)
    assert len(index) == 4 * 48 + 100
    cfg = load_config("demo", [f"data.path={data}", "data.manifest_dir=null", "data.workers=2", "data.copies=2",
                               "data.unique_batch=73", "model.ghost_size=null"])
    loader = make_train_loader(index, cfg, rank=0, world=1)
    loader.batch_sampler.set_epoch(0)
    bad, seen, files, samples = [], {}, 0, 0
    for batch in loader:  # 292 files in 4 steps of 73: the whole epoch
        bad += [entry.split(" (")[0].rsplit("/", 1)[1] for entry in batch["bad"]]
        files += batch["files"]
        samples += batch["images"].shape[0]
        images = batch["images"].view(2, 73, 64, 64, 3)
        for b, i in enumerate(batch["indices"].tolist()):
            seen[index.paths[i].rsplit("/", 1)[1]] = images[:, b]
    broken = {n for n, e in expected.items() if e is None}
    assert sorted(set(bad)) == sorted(broken) and len(broken) == 50
    # a broken file is tried again when it comes up as another's replacement: every try is a read
    assert samples == 2 * 292 and files == 292 + len(bad)
    supported = {n: e for n, e in expected.items() if e is not None}
    decoded = {n: seen[n] for n in supported if n in seen}
    assert len(decoded) >= 45  # almost all supported files appear as themselves (a few stand in twice)
    for name, copies in decoded.items():
        mean = copies.float().mean(dim=(0, 1, 2))
        assert torch.allclose(mean, torch.tensor(supported[name], dtype=torch.float), atol=4), (name, mean)
    assert not broken & set(seen)  # no broken file reached a batch
