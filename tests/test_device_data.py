"""Fashion-MNIST kept on the device and augmented there (``data.on_device``): crops, boxes, determinism."""

from __future__ import annotations

import pytest
import torch
from torchvision import transforms as T

from masksub.train.device_data import DeviceBatches, crop_resize, random_resized_boxes


def batches(images: torch.Tensor, augment: str, img_size: int) -> DeviceBatches:
    n = images.shape[0]
    return DeviceBatches(
        images,
        torch.zeros(n, dtype=torch.long),
        list(range(n)),
        n,
        img_size=img_size,
        in_chans=1,
        mean=(0.0,),
        std=(1.0,),
        augment=augment,
        hflip=0.5,
        seed=0,
        device=torch.device("cpu"),
        drop_last=True,
    )


@pytest.mark.parametrize("augment", ["simple", "pretrain"])
def test_on_device_batches_are_augmented_per_sample(augment):
    images = torch.arange(4 * 8 * 8, dtype=torch.uint8).view(4, 8, 8).repeat(16, 1, 1)  # (64, 8, 8)
    data = batches(images, augment, img_size=8)
    x, _ = next(iter(data))
    same_source = x[0::4]  # images 0, 4, 8, ... are identical before augmentation
    assert len({tuple(v.flatten().tolist()) for v in same_source}) > 4, "crops and flips differ per sample"
    again, _ = next(iter(data))
    assert torch.equal(x, again), "the same batch position gets the same augmentation"


def test_pretrain_augmentation_resizes_and_keeps_raw_pixels():
    images = torch.randint(0, 256, (32, 28, 28), dtype=torch.uint8)
    x, _ = next(iter(batches(images, "pretrain", img_size=32)))
    assert x.shape == (32, 1, 32, 32)
    assert x.min() >= 0 and x.max() <= 1, "bilinear crops of [0, 1] pixels stay in [0, 1]"


def test_random_resized_boxes_follow_torchvision_rule():
    n, h, w = 4000, 28, 28
    g = torch.Generator().manual_seed(0)
    top, left, bh, bw = random_resized_boxes(n, h, w, g, torch.device("cpu")).unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + bh <= h).all() and (left + bw <= w).all()
    small = bh < h
    assert (top[small] == 0).any() and (top + bh)[small].eq(h).any(), "offsets of smaller crops reach both edges"
    frac, log_aspect = bh * bw / (h * w), (bw / bh).log()
    assert frac.min() >= 0.2 * 0.85 and frac.max() <= 1.0

    torch.manual_seed(0)
    ref = torch.tensor(
        [T.RandomResizedCrop.get_params(torch.empty(h, w), (0.2, 1.0), (3 / 4, 4 / 3)) for _ in range(n)]
    )
    ref_frac, ref_log_aspect = ref[:, 2] * ref[:, 3] / (h * w), (ref[:, 3] / ref[:, 2]).float().log()
    assert abs(frac.mean() - ref_frac.mean()) < 0.02 and abs(frac.std() - ref_frac.std()) < 0.02
    assert abs(log_aspect.mean() - ref_log_aspect.mean()) < 0.02 and abs(log_aspect.std() - ref_log_aspect.std()) < 0.02


def test_random_resized_boxes_fall_back_to_centred_clamped_crop():
    # A 40 x 4 strip: no draw of at least 20% of the area with aspect >= 3/4 fits its width of 4.
    boxes = random_resized_boxes(5, 40, 4, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert boxes.tolist() == [[17, 0, 5, 4]] * 5  # width 4, height round(4 / (3/4)) = 5, centred


def test_crop_resize_samples_at_pixel_centres():
    img = torch.rand(2, 3, 12, 12)
    assert torch.allclose(crop_resize(img, torch.tensor([[0, 0, 12, 12]] * 2), 12), img, atol=1e-6)

    ramp = torch.arange(16.0).expand(1, 1, 16, 16).clone()  # value = column
    out = crop_resize(ramp, torch.tensor([[4, 4, 8, 8]]), 16)  # the middle 8 x 8, enlarged 2x
    expected = 4 + (torch.arange(16.0) + 0.5) * 8 / 16 - 0.5  # bilinear at the output pixel centres
    assert torch.allclose(out[0, 0], expected.expand(16, 16), atol=1e-5)
    shrunk = crop_resize(ramp, torch.tensor([[0, 0, 16, 16]]), 4)  # 4x smaller: each output averages its bin
    assert torch.allclose(shrunk[0, 0, 0], torch.tensor([1.5, 5.5, 9.5, 13.5]), atol=1e-5)


def test_on_device_where_it_does_not_apply_falls_back_to_the_loader_with_a_warning(tmp_path, caplog):
    from test_trainer import TINY, args

    from masksub.cli import main
    from masksub.train import checkpoint

    more = {"train.output": str(tmp_path), "train.name": "r", "train.max_steps": 1}
    cli = ["train", *args(TINY, **more, **{"data.on_device": True, "aug.preset": "timm"})]
    with caplog.at_level("WARNING", logger="masksub"):
        assert main(cli) == 0
    assert "data.name=fashion_mnist with aug.preset none / simple / pretrain" in caplog.text
    assert "aug.preset=timm uses the per-sample loader" in caplog.text
    assert checkpoint.load(tmp_path / "r" / "last.pt")["position"]["global_step"] == 1
