"""The augmentation recipes (notebook 03) and the model builder (notebook 02)."""
from __future__ import annotations

import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

import windows_utils as wu

SAMPLE_CLASSES = ["background", "student_id"]


@pytest.fixture(scope="module")
def sample_dataset():
    return wu.LabelMeDataset(wu.load_labelme_folder(wu.SAMPLE_DIR), SAMPLE_CLASSES)


def photo(seed: int = 0, size=(96, 64)) -> Image.Image:
    """A smooth, colourful test picture (random noise would hide hue and saturation errors)."""
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    rng = np.random.default_rng(seed)
    phases = rng.uniform(0, 2 * np.pi, 3)
    channels = [127 + 120 * np.sin(x / (7 + 3 * i) + y / (11 - 2 * i) + p) for i, p in enumerate(phases)]
    return Image.fromarray(np.stack(channels, -1).astype(np.uint8))


def as_array(image):
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize(
    "name, factor, reference",
    [
        ("brightness", 1.12, F.adjust_brightness),
        ("brightness", 0.88, F.adjust_brightness),
        ("saturation", 0.5, F.adjust_saturation),
        ("saturation", 1.5, F.adjust_saturation),
        ("contrast", 0.5, F.adjust_contrast),
        ("contrast", 1.5, F.adjust_contrast),
    ],
)
def test_fast_colour_jitter_matches_torchvision_step_by_step(name, factor, reference):
    image = photo()
    ranges = {name: (factor, factor)}
    out = wu.FastColorJitter(**ranges)(image)
    expected = reference(image, factor)
    # one matrix, one rounding: within a couple of grey levels of torchvision's own kernels
    assert np.abs(as_array(out) - as_array(expected)).max() <= 3


def hue_angle(pixels: np.ndarray) -> np.ndarray:
    """Angle of each pixel's colour in the plane perpendicular to the gray axis."""
    u = np.array([1, -1, 0]) / np.sqrt(2)
    v = np.array([1, 1, -2]) / np.sqrt(6)
    return np.arctan2(pixels @ v, pixels @ u)


@pytest.mark.parametrize("factor", [-0.05, 0.05])
def test_fast_colour_jitter_hue_turns_colours_around_the_gray_axis(factor):
    image = Image.fromarray((np.asarray(photo(1)) * 0.4 + 70).astype(np.uint8))  # no clipping
    out = as_array(wu.FastColorJitter(hue=(factor, factor))(image)).astype(float)
    src = as_array(image).astype(float)
    turned = np.angle(np.exp(1j * (hue_angle(out) - hue_angle(src))))
    colourful = np.linalg.norm(src - src.mean(-1, keepdims=True), axis=-1) > 20
    assert np.allclose(turned[colourful], 2 * np.pi * factor, atol=0.05)
    assert np.abs(out.mean(-1) - src.mean(-1)).max() <= 1  # intensity kept
    # and it goes the way torchvision's HSV hue shift goes
    expected = as_array(F.adjust_hue(image, factor))
    assert np.abs(out - expected).mean() < np.abs(src - expected).mean()


def test_fast_colour_jitter_identity_and_tensor_path():
    image = photo(2)
    same = wu.FastColorJitter()(image)
    assert np.abs(as_array(same) - as_array(image)).max() <= 1
    jitter = wu.FastColorJitter(brightness=(0.9, 0.9), contrast=(1.3, 1.3), saturation=(0.7, 0.7), hue=(0.03, 0.03))
    torch.manual_seed(0)
    from_pil = jitter(image)
    torch.manual_seed(0)
    from_tensor = jitter(tv_tensors.Image(F.pil_to_tensor(image)))
    assert isinstance(from_tensor, tv_tensors.Image) and from_tensor.dtype == torch.uint8
    assert np.abs(as_array(from_pil) - from_tensor.permute(1, 2, 0).numpy().astype(np.int16)).max() <= 1


def test_fast_colour_jitter_leaves_masks_and_boxes_alone():
    mask = tv_tensors.Mask(torch.ones(1, 64, 96, dtype=torch.bool))
    boxes = tv_tensors.BoundingBoxes([[1, 2, 30, 40]], format="XYXY", canvas_size=(64, 96))
    _, out_mask, out_boxes = wu.FastColorJitter(brightness=(0.5, 0.5))(photo(), mask, boxes)
    assert torch.equal(out_mask, mask) and torch.equal(out_boxes, boxes)


def test_iou_crop_without_instances_does_not_crop():
    image = tv_tensors.Image(torch.zeros(3, 50, 80, dtype=torch.uint8))
    boxes = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(50, 80))
    out, _ = wu.RandomIoUCropJitter()(image, boxes)
    assert out.shape == image.shape


def test_iou_crop_stays_inside_the_image():
    torch.manual_seed(0)
    crop = wu.RandomIoUCropJitter(jitter=2.0)  # a large jitter pushes centres off the image
    boxes = tv_tensors.BoundingBoxes([[70, 40, 80, 50]], format="XYXY", canvas_size=(50, 80))
    for _ in range(50):
        params = crop.make_params([tv_tensors.Image(torch.zeros(3, 50, 80)), boxes])
        if params:
            assert 0 <= params["left"] and params["left"] + params["width"] <= 80
            assert 0 <= params["top"] and params["top"] + params["height"] <= 50


def test_pad_to_square_centres_without_random_offset():
    image = tv_tensors.Image(torch.full((3, 40, 100), 255, dtype=torch.uint8))
    out = wu.PadToSquare(random_offset=False)(image)
    assert out.shape == (3, 100, 100)
    assert out[:, :30].sum() == 0 and out[:, 70:].sum() == 0 and bool((out[:, 30:70] == 255).all())


@pytest.mark.parametrize("train", [True, False])
def test_recipes_keep_their_promises(sample_dataset, train):
    """The properties notebook 03 checks at scale, on a few draws at a small size."""
    size = 128
    transforms = wu.build_transforms(train=train, size=size)
    torch.manual_seed(0)
    for i in range(24):
        source_labels = sample_dataset[i % len(sample_dataset)][1]["labels"].tolist()
        sample_dataset.transforms = transforms
        try:
            image, target = sample_dataset[i % len(sample_dataset)]
        finally:
            sample_dataset.transforms = None
        assert image.shape == (3, size, size) and image.dtype == torch.float32
        assert 0 <= image.min() and image.max() <= 1
        masks, boxes = target["masks"], target["boxes"]
        assert masks.flatten(1).any(1).all(), "no empty masks"
        assert torch.equal(boxes, wu.boxes_from_masks(masks)), "boxes tight around their masks"
        assert (boxes[:, 2:] > boxes[:, :2]).all() and boxes.min() >= 0 and boxes.max() <= size
        assert len(masks) == len(boxes) == len(target["labels"]), "one label per mask and box"
        assert set(target["labels"].tolist()) <= set(source_labels)
        if not train:
            assert len(target["labels"]) == len(source_labels), "validation keeps every instance"


def test_boxes_from_masks_matches_torchvision():
    from torchvision.ops import masks_to_boxes

    generator = torch.Generator().manual_seed(0)
    masks = torch.rand(6, 40, 50, generator=generator) > 0.995
    masks[0] = False
    masks[0, 39, 49] = True  # one pixel in the corner
    masks = masks[masks.flatten(1).any(1)]
    expected = masks_to_boxes(masks)
    expected[:, 2:] += 1
    assert torch.equal(wu.boxes_from_masks(masks), expected)
    assert wu.nonempty_masks(torch.zeros(2, 5, 5, dtype=torch.bool)).tolist() == [False, False]


def test_build_model_sizes_heads_and_input_resolution():
    model = wu.build_model(3, image_size=256, pretrained=False)
    assert model.roi_heads.box_predictor.cls_score.out_features == 3
    assert model.roi_heads.box_predictor.bbox_pred.out_features == 12
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 3
    assert model.transform.min_size == (256,) and model.transform.max_size == 256


def test_build_model_without_weights_says_so_and_never_downloads(tmp_path, monkeypatch, capsys):
    import torchvision.models._api as weights_api

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(weights_api, "load_state_dict_from_url", offline)
    wu.build_model(2, image_size=128, pretrained=True, download=True)
    assert "NO PRETRAINED WEIGHTS" in capsys.readouterr().out

    def must_not_download(*args, **kwargs):
        pytest.fail("tried to download with download=False")

    monkeypatch.setattr(weights_api, "load_state_dict_from_url", must_not_download)
    wu.build_model(2, image_size=128, pretrained=True, download=False)
    assert "downloads are off" in capsys.readouterr().out


def test_helpers_accept_no_masks_at_all():
    for masks in (torch.zeros(0, 5, 7, dtype=torch.bool), torch.zeros(0, 0, 0, dtype=torch.bool)):
        assert wu.boxes_from_masks(masks).shape == (0, 4)
        assert wu.nonempty_masks(masks).shape == (0,)


@pytest.mark.parametrize("train", [True, False])
def test_recipes_handle_an_image_without_instances(train):
    target = {
        "masks": tv_tensors.Mask(torch.zeros(0, 50, 80, dtype=torch.bool)),
        "boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(50, 80)),
        "labels": torch.zeros(0, dtype=torch.int64),
    }
    image, out = wu.build_transforms(train=train, size=64)(photo(size=(80, 50)), target)
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert out["boxes"].shape == (0, 4) and out["masks"].shape == (0, 64, 64) and len(out["labels"]) == 0
