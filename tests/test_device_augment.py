"""augment.where=device: one decode per image in the worker, the M crops made in one roi_align call
on the training device (here the CPU; CI has no GPU). Same draws, same distributions, same pixels
(up to resampling noise) as the loader path."""
import numpy as np
import pytest
import torch
from PIL import Image

from hvd_ba.config import load_config
from hvd_ba.data.copies_on_device import canvas_copies
from hvd_ba.data.model_input import unit_pixels
from hvd_ba.data.manifest import load_index
from hvd_ba.data.copies import BACollate, BATrainSet
from hvd_ba.data.pipeline import make_train_loader
from hvd_ba.data.augment import TrainPreset, image_rng
from hvd_ba.data.copies import make_copies


@pytest.mark.unit
def test_device_crops_match_the_loader_copies(small_data):
    """Same files, same (seed, epoch, index): the device path's crops equal the CPU path's crops
    up to resampling noise, flips and lighting offsets included, in the same copy-major order."""
    index = load_index(small_data, "train", None)
    preset = TrainPreset(size=64, scale=(0.08, 1.0), lighting_std=0.1)
    loader_set = BATrainSet(index, 4, preset, seed=3)
    device_set = BATrainSet(index, 4, preset, seed=3, canvas=512)
    keys = [(i, 1, ()) for i in range(6)]
    cpu = BACollate()([loader_set[k] for k in keys])
    dev = BACollate()([device_set[k] for k in keys])
    assert "images" not in dev and dev["canvas"].shape[0] == 6 and dev["boxes"].shape == (24, 4)
    assert torch.equal(cpu["labels"], dev["labels"]) and torch.equal(cpu["lighting"], dev["lighting"])
    assert dev["owner"].tolist() == [b for _ in range(4) for b in range(6)]  # copy-major
    a = unit_pixels(cpu, torch.device("cpu")) * 255
    b = unit_pixels(dev, torch.device("cpu")) * 255
    assert a.shape == b.shape == (24, 3, 64, 64)
    diff = (a - b).abs().mean(dim=(1, 2, 3))
    assert diff.mean() < 4.0 and diff.max() < 12.0, diff
    # a flipped device crop against the unflipped CPU crop is far off: the flips are really applied
    flipped = dev["flips"].clone()
    flipped[0] = ~flipped[0]
    c = unit_pixels({**dev, "flips": flipped}, torch.device("cpu")) * 255
    assert (a[0] - c[0]).abs().mean() > 3 * diff[0] + 1


@pytest.mark.unit
def test_canvas_boxes_are_the_cpu_draws(small_data):
    """The device path draws its boxes with the same calls and generator as the CPU path, so the
    crop-parameter distribution is the preset's; the canvas is bounded and the boxes follow it."""
    path = sorted((small_data / "train").rglob("*.JPEG"))[0]
    preset = TrainPreset(size=64)
    with Image.open(path) as img:
        width, height = img.size
        item = canvas_copies(img, preset, 8, image_rng(0, 2, 5), canvas=120)
    rng = image_rng(0, 2, 5)
    draws = [preset.draw(width, height, rng) for _ in range(8)]
    h, w = item["canvas"].shape[:2]
    assert max(h, w) == 120 and abs(w / h - width / height) < 0.02
    src = np.array([d[0] for d in draws])
    sx, sy = w / width, h / height
    np.testing.assert_allclose(item["boxes"] / [sx, sy, sx, sy], src, rtol=0.02, atol=1.0)
    assert item["flips"].tolist() == [d[1] for d in draws]


@pytest.mark.unit
def test_device_box_statistics_match_torchvision():
    """Area fraction and aspect of the boxes a device batch carries (mapped back to the source
    image) against torchvision's RandomResizedCrop.get_params on the same image size."""
    import torchvision.transforms as T

    width, height, n = 500, 375, 3000
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), np.uint8))
    preset = TrainPreset(size=32)
    boxes = []
    for i in range(n // 4):
        item = canvas_copies(img.copy(), preset, 4, image_rng(0, 0, i), canvas=250)
        boxes.append(item["boxes"] * 2)  # canvas 250 = half of 500
    b = np.concatenate(boxes)
    torch.manual_seed(0)
    ref = np.array([T.RandomResizedCrop.get_params(torch.empty(1, height, width), [0.08, 1.0], [3 / 4, 4 / 3])
                    for _ in range(n)], float)
    ours_area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / (width * height)
    ref_area = ref[:, 2] * ref[:, 3] / (width * height)
    ours_aspect = np.log((b[:, 2] - b[:, 0]) / (b[:, 3] - b[:, 1]))
    ref_aspect = np.log(ref[:, 3] / ref[:, 2])
    for ours, theirs in ((ours_area, ref_area), (ours_aspect, ref_aspect)):
        assert abs(ours.mean() - theirs.mean()) < 0.03, (ours.mean(), theirs.mean())
        assert np.abs(np.quantile(ours, [0.1, 0.5, 0.9]) - np.quantile(theirs, [0.1, 0.5, 0.9])).max() < 0.05


@pytest.mark.unit
def test_device_loader_sends_one_decoded_image_per_file(small_data):
    """Through the real loader (a worker process): B canvases and M*B boxes per batch, the same
    files and labels as the loader path, and the crops come out at augment.size."""
    overrides = ["data.unique_batch=4", "data.copies=3", "data.workers=1", "augment.size=48", "model.ghost_size=null",
                 f"data.path={small_data}", "data.manifest_dir=null"]
    index = load_index(small_data, "train", None)
    cpu = make_train_loader(index, load_config("demo", overrides), 0, 2)
    dev = make_train_loader(index, load_config("demo", overrides + ["augment.where=device"]), 0, 2)
    for x, y in zip(cpu, dev):
        assert torch.equal(x["indices"], y["indices"]) and torch.equal(x["labels"], y["labels"])
        assert y["canvas"].shape[0] == 4 and y["boxes"].shape == (12, 4)
        assert unit_pixels(y, torch.device("cpu")).shape == x["images"].permute(0, 3, 1, 2).shape
        assert y["files"] == x["files"] == 4


@pytest.mark.unit
def test_make_copies_and_canvas_copies_draw_alike(small_data):
    """Lighting offsets and flips come from the same draws in both paths."""
    path = sorted((small_data / "train").rglob("*.JPEG"))[1]
    preset = TrainPreset(size=64, lighting_std=0.1)
    with Image.open(path) as img:
        _, lighting = make_copies(img, preset, 5, image_rng(1, 0, 9))
    with Image.open(path) as img:
        item = canvas_copies(img, preset, 5, image_rng(1, 0, 9), canvas=512)
    np.testing.assert_array_equal(lighting, item["lighting"])


@pytest.mark.integration
def test_two_ranks_train_with_device_augmentation(small_data, tmp_path):
    """horovodrun -np 2 with augment.where=device: ranks in lockstep, and the same run as the
    loader path up to resampling noise (the same files, boxes, flips and offsets)."""
    import json

    from helpers import launch
    from hvd_ba.train.records import read_jsonl

    runs = {}
    for where in ("loader", "device"):
        out = tmp_path / where
        r = launch("gloo", small_data, out, extra=["optim.epochs=2", f"augment.where={where}"])
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in (0, 1)]
        assert ranks[0]["param_sha256"] == ranks[1]["param_sha256"]
        runs[where] = read_jsonl(out / "metrics.jsonl")
    for a, b in zip(runs["loader"], runs["device"]):
        assert a["files_read_per_rank"] == b["files_read_per_rank"] and a["samples"] == b["samples"]
        assert abs(a["train_loss"] - b["train_loss"]) < 0.05 * a["train_loss"], (a["train_loss"], b["train_loss"])
