"""The augmentation recipes (notebook 03) and the model builder (notebook 02)."""
from __future__ import annotations

import urllib.error

import numpy as np
import pytest
import torch
from labelme_fixtures import shape, square, write_image, write_labelme
from PIL import Image, ImageDraw
from torchvision.transforms.v2 import functional as F

from maskrcnn_labelme import augment, download, labelme, models, targets
import windows_utils

SAMPLE_CLASSES = ["background", "student_id"]


@pytest.fixture(scope="module")
def sample_dataset():
    return windows_utils.LabelMeDataset(labelme.load_labelme_folder(download.SAMPLE_DIR), SAMPLE_CLASSES)


def photo(seed: int = 0, size=(96, 64)) -> Image.Image:
    """A smooth, colourful test picture (random noise would hide hue and saturation errors)."""
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    rng = np.random.default_rng(seed)
    phases = rng.uniform(0, 2 * np.pi, 3)
    channels = [127 + 120 * np.sin(x / (7 + 3 * i) + y / (11 - 2 * i) + p) for i, p in enumerate(phases)]
    return Image.fromarray(np.stack(channels, -1).astype(np.uint8))


def as_array(image):
    return np.asarray(image, dtype=np.int16)


def as_pixels(image: Image.Image) -> torch.Tensor:
    return F.pil_to_tensor(image)


def colour_plan(size=(96, 64), **choices) -> augment.AugmentPlan:
    """A plan that keeps the whole image and makes only the given colour choices."""
    return augment.AugmentPlan(crop=(0, 0, *size), resized=size, offset=(0, 0), **choices)


def recoloured(image: Image.Image, **choices) -> np.ndarray:
    out = augment.Recipe.recolour(as_pixels(image), colour_plan(image.size, **choices))
    return out.permute(1, 2, 0).numpy().astype(np.int16)


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
def test_colour_matrix_matches_torchvision_step_by_step(name, factor, reference):
    image = photo()
    expected = reference(image, factor)
    # one matrix, one rounding: within a couple of grey levels of torchvision's own kernels
    assert np.abs(recoloured(image, jitter=((name, factor),)) - as_array(expected)).max() <= 3


def test_colour_matrix_composes_steps_in_the_planned_order():
    # a narrow range, so that torchvision's clipping after each step never comes into play
    image = Image.fromarray((np.asarray(photo(3)) * 0.5 + 60).astype(np.uint8))
    jitter = (("contrast", 1.3), ("saturation", 0.7), ("brightness", 0.9))
    expected = image
    for name, factor in jitter:
        expected = getattr(F, f"adjust_{name}")(expected, factor)
    assert np.abs(recoloured(image, jitter=jitter) - as_array(expected)).max() <= 4
    # the order matters where the steps do not commute: a hue turn changes a pixel's luma
    # (the gray that saturation blends with), a saturation blend does not change its hue
    hue_first = recoloured(image, jitter=(("hue", 0.05), ("saturation", 0.3)))
    assert np.abs(hue_first - recoloured(image, jitter=(("saturation", 0.3), ("hue", 0.05)))).max() > 2


def hue_angle(pixels: np.ndarray) -> np.ndarray:
    """Angle of each pixel's colour in the plane perpendicular to the gray axis."""
    u = np.array([1, -1, 0]) / np.sqrt(2)
    v = np.array([1, 1, -2]) / np.sqrt(6)
    return np.arctan2(pixels @ v, pixels @ u)


@pytest.mark.parametrize("factor", [-0.05, 0.05])
def test_hue_turns_colours_around_the_gray_axis(factor):
    image = Image.fromarray((np.asarray(photo(1)) * 0.4 + 70).astype(np.uint8))  # no clipping
    out = recoloured(image, jitter=(("hue", factor),)).astype(float)
    src = as_array(image).astype(float)
    turned = np.angle(np.exp(1j * (hue_angle(out) - hue_angle(src))))
    colourful = np.linalg.norm(src - src.mean(-1, keepdims=True), axis=-1) > 20
    assert np.allclose(turned[colourful], 2 * np.pi * factor, atol=0.05)
    assert np.abs(out.mean(-1) - src.mean(-1)).max() <= 1  # intensity kept
    # and it goes the way torchvision's HSV hue shift goes
    expected = as_array(F.adjust_hue(image, factor))
    assert np.abs(out - expected).mean() < np.abs(src - expected).mean()


def test_recolour_without_colour_choices_returns_the_pixels_untouched():
    pixels = as_pixels(photo(2))
    assert augment.Recipe.recolour(pixels, colour_plan()) is pixels
    identity = (("brightness", 1.0), ("contrast", 1.0), ("saturation", 1.0), ("hue", 0.0))
    assert np.abs(recoloured(photo(2), jitter=identity) - as_array(photo(2))).max() == 0


def test_grayscale_matches_torchvision():
    image = photo(4)
    expected = as_array(F.rgb_to_grayscale(image, num_output_channels=3))
    assert np.abs(recoloured(image, grayscale=True) - expected).max() <= 1


@pytest.mark.parametrize("seed", range(3))
def test_equalize_and_posterize_tables_match_torchvision_exactly(seed):
    image = photo(seed)
    pixels = as_pixels(image)
    assert np.array_equal(recoloured(image, equalize=True), as_array(F.to_pil_image(F.equalize(pixels))))
    assert np.array_equal(recoloured(image, posterize_bits=3), as_array(F.to_pil_image(F.posterize(pixels, 3))))
    both = F.posterize(F.equalize(pixels), 3)
    assert np.array_equal(recoloured(image, equalize=True, posterize_bits=3),
                          both.permute(1, 2, 0).numpy().astype(np.int16))


def test_equalize_table_of_a_flat_image_is_the_identity():
    histogram = np.zeros(256, dtype=np.int64)
    histogram[77] = 1000
    assert np.array_equal(augment.equalize_table(histogram), np.arange(256))


def test_crop_keeps_the_whole_image_without_instances():
    assert augment.Recipe(64, train=True).sample_crop(80, 50, np.zeros((0, 4))) == (0, 0, 80, 50)
    outside = np.array([[0.0, 0.0, 0.0, 0.0]])  # an instance with no extent left in the image
    assert augment.Recipe(64, train=True).sample_crop(80, 50, outside) == (0, 0, 80, 50)


def test_crop_stays_inside_the_image_and_near_an_instance():
    torch.manual_seed(0)
    recipe = augment.Recipe(64, train=True, crop_jitter=2.0)  # a large jitter pushes centres off the image
    boxes = np.array([[70.0, 40.0, 80.0, 50.0]])
    crops = {recipe.sample_crop(80, 50, boxes) for _ in range(200)}
    assert len(crops) > 20, "crops vary"
    for left, top, width, height in crops:
        assert 0 <= left and left + width <= 80 and 0 <= top and top + height <= 50
        if (width, height) != (80, 50):
            assert left < 75 < left + width and top < 45 < top + height, "the instance's centre is kept"


def test_validation_plan_centres_the_whole_image(tmp_path):
    sample = labelme.load_labelme_file(write_labelme(tmp_path, [], size=(200, 80)))
    recipe = augment.Recipe(100, train=False)
    plan = recipe.plan(sample)
    assert plan.crop == (0, 0, 200, 80) and plan.resized == (100, 40) and plan.offset == (0, 30)
    assert not (plan.flip or plan.jitter or plan.grayscale or plan.equalize or plan.posterize_bits)
    image = recipe.place_image(torch.full((3, 40, 100), 255, dtype=torch.uint8), plan)
    assert image.shape == (3, 100, 100) and image.dtype == torch.float32
    assert image[:, :30].sum() == 0 and image[:, 70:].sum() == 0 and bool((image[:, 30:70] == 1).all())


def test_decode_crop_of_a_scaled_down_photo_covers_the_planned_region(tmp_path):
    """A big JPEG is decoded scaled down; the crop and the masks' region still match."""
    write_image(tmp_path / "big.jpg", (800, 600))
    sample = labelme.load_labelme_file(write_labelme(tmp_path, [square("card", 100, 80, 500, 400)],
                                                image=False, size=(800, 600), imagePath="big.jpg"))
    recipe = augment.Recipe(64, train=False)  # decodes at >= 80 px: libjpeg's 1/8 scale, 100 x 75
    assert tuple(sample.load_pixels(augment.decode_side(64)).shape) == (3, 75, 100)
    plan = augment.AugmentPlan(crop=(101, 75, 403, 302), resized=(64, 48), offset=(0, 8))
    pixels, region = recipe.decode_crop(sample, plan)
    assert tuple(pixels.shape) == (3, 38, 50)  # (403, 302) / 8, rounded at both ends
    assert region == (104.0, 72.0, 504.0, 376.0)  # whole decoded pixels, in the sample's pixels
    planned = (101, 75, 101 + 403, 75 + 302)
    assert all(abs(a - b) <= 4 for a, b in zip(region, planned)), "within half a decoded pixel"


def test_place_flips_image_and_masks_alike():
    recipe = augment.Recipe(8, train=True)
    plan = augment.AugmentPlan(crop=(0, 0, 4, 2), resized=(4, 2), offset=(3, 5), flip=True)
    pixels = torch.zeros(3, 2, 4, dtype=torch.uint8)
    pixels[:, :, 0] = 255  # left column white
    masks = np.zeros((1, 2, 4), dtype=bool)
    masks[:, :, 0] = True
    image, placed = recipe.place_image(pixels, plan), recipe.place_masks(masks, plan)
    assert torch.equal(image[0] == 1, placed[0]), "the mask follows the pixels"
    assert placed[0, 5:7, 6].all() and placed.sum() == 2, "left column moved to the right end"


NO_COLOUR = dict(brightness=(1, 1), contrast=(1, 1), saturation=(1, 1), hue=(0, 0),
                 grayscale_p=0, equalize_p=0, posterize_p=0)


def drawn_aligned(sample, *, draws: int, min_iou: float) -> list[torch.Tensor]:
    """Train-recipe draws (96 px, no colour changes) of a sample whose one instance is the white
    part of its photo; asserts the white pixels and the mask agree; returns the images."""
    recipe = augment.Recipe(96, train=True, **NO_COLOUR)
    images = []
    for _ in range(draws):
        image, target = recipe(sample, [1])
        if len(target["masks"]) == 0:
            continue
        white, mask = image.mean(0) > 0.5, target["masks"][0]
        iou = (white & mask).sum() / (white | mask).sum()
        assert iou > min_iou, f"image and mask disagree (IoU {iou:.2f})"
        images.append(image)
    return images


def alignment_sample(folder):
    """A black photo with one white tilted quadrilateral, annotated with exactly that polygon."""
    points = [[30, 12], [150, 30], [140, 100], [20, 85]]
    image = Image.new("RGB", (180, 120))
    ImageDraw.Draw(image).polygon([tuple(p) for p in points], fill=(255, 255, 255), outline=(255, 255, 255))
    image.save(folder / "card.png")
    write_labelme(folder, [shape("card", points)], name="card", image=False, size=(180, 120),
                  imagePath="card.png")
    return labelme.load_labelme_file(folder / "card.json")


def test_train_recipe_keeps_image_and_masks_aligned(tmp_path):
    """Crops, resizes, flips and offsets move the pixels and the drawn masks together."""
    sample = alignment_sample(tmp_path)
    torch.manual_seed(0)
    images = drawn_aligned(sample, draws=40, min_iou=0.9)
    flips = sum(int(image[:, :, :48].sum() > image[:, :, 48:].sum()) for image in images)
    assert flips > 0, "some draws were mirrored"


@pytest.mark.parametrize("upright_size", [(1200, 1600), (1203, 1601)])
def test_recipe_keeps_a_large_rotated_jpeg_aligned(tmp_path, upright_size):
    """A phone-style JPEG stored sideways (EXIF orientation 6) and decoded scaled down: at 1/8
    when both sides allow it, in full when a side is odd."""
    width, height = upright_size
    points = [[150, 200], [1000, 330], [950, 1300], [120, 1150]]
    upright = Image.new("RGB", upright_size)
    ImageDraw.Draw(upright).polygon([tuple(p) for p in points], fill=(255, 255, 255))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # orientation 6 turns it back
    write_image(tmp_path / "photo.jpg", pixels=np.asarray(stored), exif_orientation=6)
    sample = labelme.load_labelme_file(write_labelme(tmp_path, [shape("card", points)], image=False,
                                                size=upright_size, imagePath="photo.jpg"))
    # the decoded pixels are an exact fraction of the photo, which decode_crop's mapping relies on
    pixels = sample.load_pixels(augment.decode_side(96))
    factor = width / pixels.shape[2]
    assert factor == int(factor) and pixels.shape[1] * factor == height
    assert factor == (8 if width % 8 == 0 and height % 8 == 0 else 1)
    torch.manual_seed(1)
    drawn_aligned(sample, draws=20, min_iou=0.95)


@pytest.mark.parametrize("train", [True, False])
def test_recipes_keep_their_promises(sample_dataset, train):
    """The properties notebook 03 checks at scale, on a few draws at a small size."""
    size = 128
    recipe = augment.build_transforms(train=train, size=size)
    dataset = windows_utils.LabelMeDataset(sample_dataset.samples, SAMPLE_CLASSES, transforms=recipe)
    torch.manual_seed(0)
    for i in range(24):
        source_labels = sample_dataset[i % len(sample_dataset)][1]["labels"].tolist()
        image, target = dataset[i % len(dataset)]
        assert image.shape == (3, size, size) and image.dtype == torch.float32
        assert 0 <= image.min() and image.max() <= 1
        masks, boxes = target["masks"], target["boxes"]
        assert masks.shape[-2:] == (size, size) and masks.dtype == torch.bool
        assert masks.flatten(1).any(1).all(), "no empty masks"
        assert torch.equal(boxes, targets.boxes_from_masks(masks)), "boxes tight around their masks"
        assert (boxes[:, 2:] > boxes[:, :2]).all() and boxes.min() >= 0 and boxes.max() <= size
        assert len(masks) == len(boxes) == len(target["labels"]), "one label per mask and box"
        assert set(target["labels"].tolist()) <= set(source_labels)
        if not train:
            assert len(target["labels"]) == len(source_labels), "validation keeps every instance"


def test_validation_recipe_matches_the_full_size_masks(sample_dataset):
    """Masks drawn at the final size agree with full-size masks resized the usual way."""
    recipe = augment.build_transforms(train=False, size=128)
    for i, sample in enumerate(sample_dataset.samples[:4]):
        _, target = recipe(sample, sample_dataset._labels[i])
        full = torch.from_numpy(sample.rasterize())[:, None].float()
        plan = recipe.plan(sample)
        width, height = plan.resized
        resized = torch.nn.functional.interpolate(full, size=(height, width), mode="bilinear")[:, 0] > 0.5
        left, top = plan.offset
        drawn = target["masks"][:, top : top + height, left : left + width]
        iou = (drawn & resized).flatten(1).sum(1) / (drawn | resized).flatten(1).sum(1)
        assert (iou > 0.95).all(), iou


def test_recipe_handles_an_image_without_instances(tmp_path):
    sample = labelme.load_labelme_file(write_labelme(tmp_path, []))
    for train in (True, False):
        image, out = augment.build_transforms(train=train, size=64)(sample, [])
        assert image.shape == (3, 64, 64) and image.dtype == torch.float32
        assert out["boxes"].shape == (0, 4) and out["masks"].shape == (0, 64, 64) and len(out["labels"]) == 0


def test_recipe_prints_its_steps():
    text = repr(augment.build_transforms(train=True, size=512))
    for step in ("crop around a random instance", "resize the longest side to 512", "colour matrix",
                 "lookup table", "flip", "masks drawn"):
        assert step in text
    assert "crop" not in repr(augment.build_transforms(train=False, size=512))


def test_boxes_from_masks_matches_torchvision():
    from torchvision.ops import masks_to_boxes

    generator = torch.Generator().manual_seed(0)
    masks = torch.rand(6, 40, 50, generator=generator) > 0.995
    masks[0] = False
    masks[0, 39, 49] = True  # one pixel in the corner
    masks = masks[masks.flatten(1).any(1)]
    expected = masks_to_boxes(masks)
    expected[:, 2:] += 1
    assert torch.equal(targets.boxes_from_masks(masks), expected)
    assert targets.nonempty_masks(torch.zeros(2, 5, 5, dtype=torch.bool)).tolist() == [False, False]


def test_build_model_sizes_heads_and_input_resolution():
    model = models.build_model(3, image_size=256, pretrained=False)
    assert model.roi_heads.box_predictor.cls_score.out_features == 3
    assert model.roi_heads.box_predictor.bbox_pred.out_features == 12
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 3
    assert model.transform.min_size == (256,) and model.transform.max_size == 256


def test_build_model_without_weights_says_so_and_never_downloads(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    models.build_model(2, image_size=128, pretrained=True, download=True)
    assert "NO PRETRAINED WEIGHTS" in capsys.readouterr().out

    def must_not_download(*args, **kwargs):
        pytest.fail("tried to download with download=False")

    monkeypatch.setattr(torch.hub, "download_url_to_file", must_not_download)
    models.build_model(2, image_size=128, pretrained=True, download=False)
    assert "downloads are off" in capsys.readouterr().out


def test_helpers_accept_no_masks_at_all():
    for masks in (torch.zeros(0, 5, 7, dtype=torch.bool), torch.zeros(0, 0, 0, dtype=torch.bool)):
        assert targets.boxes_from_masks(masks).shape == (0, 4)
        assert targets.nonempty_masks(masks).shape == (0,)


def test_prepare_for_training_leaves_a_cpu_model_as_it_is():
    model = torch.nn.Conv2d(3, 4, 3)
    assert models.prepare_for_training(model, torch.device("cpu")) is model
    assert model.weight.is_contiguous() and model.weight.device.type == "cpu"
