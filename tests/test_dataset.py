"""LabelMeDataset: what Mask R-CNN receives, and that it survives spawn-started DataLoader workers."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from labelme_fixtures import HEIGHT, WIDTH, png_base64, shape, square, write_image, write_labelme
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes
from torchvision.transforms import v2

from maskrcnn_labelme.labelme import LabelMeError, LabelMeWarning, load_labelme_file, load_labelme_folder
from windows_utils import LabelMeDataset, collate_detection

pytestmark = pytest.mark.filterwarnings("error::maskrcnn_labelme.labelme.LabelMeWarning")

CLASSES = ["background", "cat", "dog"]


@pytest.fixture
def samples(tmp_path):
    """a: a cat polygon and a dog rectangle; b: no shapes; c: a cat, image embedded in imageData."""
    write_labelme(
        tmp_path,
        [square("cat", 10, 5, 20, 15), shape("dog", [[50, 40], [30, 20]], "rectangle")],
        name="a",
    )
    write_labelme(tmp_path, [], name="b")
    embedded = png_base64(np.full((HEIGHT, WIDTH, 3), 200, dtype=np.uint8))
    write_labelme(tmp_path, [square("cat", 0, 0, 7, 7)], name="c", image=False, imageData=embedded)
    return load_labelme_folder(tmp_path)


def test_item_has_the_types_mask_rcnn_expects(samples):
    image, target = LabelMeDataset(samples, CLASSES)[0]
    assert (
        type(image) is tv_tensors.Image
        and image.dtype == torch.float32
        and image.shape == (3, HEIGHT, WIDTH)
    )
    assert torch.allclose(image, torch.full_like(image, 100 / 255))  # uint8 100, scaled to [0, 1]
    masks, boxes, labels = target["masks"], target["boxes"], target["labels"]
    assert (
        type(masks) is tv_tensors.Mask
        and masks.dtype == torch.bool
        and masks.shape == (2, HEIGHT, WIDTH)
    )
    assert (
        type(boxes) is tv_tensors.BoundingBoxes
        and boxes.dtype == torch.float32
        and boxes.shape == (2, 4)
    )
    assert boxes.format == tv_tensors.BoundingBoxFormat.XYXY and tuple(boxes.canvas_size) == (
        HEIGHT,
        WIDTH,
    )
    assert labels.dtype == torch.int64 and labels.tolist() == [1, 2]


def test_boxes_are_tight_around_their_masks_and_cover_whole_pixels(samples):
    _, target = LabelMeDataset(samples, CLASSES)[0]
    expected = masks_to_boxes(target["masks"]) + torch.tensor([0, 0, 1, 1])
    assert torch.equal(target["boxes"].as_subclass(torch.Tensor), expected)
    # The cat polygon covers pixels 10..20 x 5..15, the dog rectangle 30..50 x 20..40.
    assert target["boxes"].tolist() == [[10, 5, 21, 16], [30, 20, 51, 41]]


def test_image_without_instances_gives_empty_targets(samples):
    image, target = LabelMeDataset(samples, CLASSES)[1]
    assert image.shape == (3, HEIGHT, WIDTH)
    assert target["masks"].shape == (0, HEIGHT, WIDTH) and target["masks"].dtype == torch.bool
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64


def test_image_from_embedded_image_data(samples):
    image, target = LabelMeDataset(samples, CLASSES)[2]
    assert torch.allclose(image, torch.full_like(image, 200 / 255))
    assert target["boxes"].tolist() == [[0, 0, 8, 8]]


def test_instances_with_empty_masks_are_dropped(tmp_path):
    json_path = write_labelme(tmp_path, [square("dog", 200, 200, 220, 220), square("cat", 2, 2, 9, 9)])
    with pytest.warns(LabelMeWarning, match="outside"):
        sample = load_labelme_file(json_path)
    _, target = LabelMeDataset([sample], CLASSES)[0]
    assert target["labels"].tolist() == [1] and target["masks"].shape[0] == target["boxes"].shape[0] == 1


def test_unknown_label_fails_at_construction_naming_file_shape_and_classes(tmp_path):
    write_labelme(tmp_path, [square("cat", 1, 1, 5, 5), square("Cat", 10, 1, 15, 5)], name="a")
    with pytest.warns(LabelMeWarning, match="differ only in case"):
        samples = load_labelme_folder(tmp_path)
    with pytest.raises(LabelMeError) as caught:
        LabelMeDataset(samples, CLASSES)
    message = str(caught.value)
    assert "a.json" in message and "shape 1" in message and "'Cat'" in message
    assert "'cat', 'dog'" in message  # the known classes


def test_background_cannot_label_an_instance(tmp_path):
    write_labelme(tmp_path, [square("background", 1, 1, 5, 5)])
    with pytest.raises(LabelMeError, match="is the background"):
        LabelMeDataset(load_labelme_folder(tmp_path), CLASSES)


@pytest.mark.parametrize("class_names", [["background"], ["background", "cat", "cat"]])
def test_class_names_must_be_unique_with_at_least_one_class(samples, class_names):
    with pytest.raises(ValueError, match="class_names"):
        LabelMeDataset(samples, class_names)


def test_max_side_decodes_and_rasterizes_at_the_reduced_size(tmp_path):
    write_image(tmp_path / "big.jpg", (128, 96))
    json_path = write_labelme(
        tmp_path,
        [shape("cat", [[32, 16], [95, 79]], "rectangle")],
        name="big",
        image=False,
        size=(128, 96),
        imagePath="big.jpg",
    )
    image, target = LabelMeDataset([load_labelme_file(json_path)], CLASSES, max_side=32)[0]
    assert image.shape == (3, 24, 32) and target["masks"].shape == (1, 24, 32)
    assert tuple(target["boxes"].canvas_size) == (24, 32)
    assert target["boxes"].tolist() == [[8, 4, 24, 20]]  # the full-size box (32, 16, 96, 80) / 4
    with pytest.raises(ValueError, match="max_side"):
        LabelMeDataset([], CLASSES, max_side=0)


def test_transforms_are_applied_to_image_and_target_before_float_conversion(samples):
    plain_image, plain = LabelMeDataset(samples, CLASSES)[0]
    flipped_image, flipped = LabelMeDataset(samples, CLASSES, transforms=v2.RandomHorizontalFlip(p=1.0))[
        0
    ]
    assert flipped_image.dtype == torch.float32
    assert torch.equal(flipped_image, plain_image.flip(-1))
    assert torch.equal(flipped["masks"], plain["masks"].flip(-1))
    assert flipped["boxes"].tolist() == [
        [WIDTH - 21, 5, WIDTH - 10, 16],
        [WIDTH - 51, 20, WIDTH - 30, 41],
    ]


def test_a_pipeline_that_already_converts_to_float_is_not_scaled_twice(samples):
    to_float = v2.Compose([v2.ToDtype(torch.float32, scale=True)])
    image, _ = LabelMeDataset(samples, CLASSES, transforms=to_float)[0]
    assert torch.allclose(image, torch.full_like(image, 100 / 255))


def test_dataset_pickles(samples):
    dataset = pickle.loads(
        pickle.dumps(LabelMeDataset(samples, CLASSES, transforms=v2.RandomHorizontalFlip(p=1.0)))
    )
    assert len(dataset) == 3 and dataset[0][1]["labels"].tolist() == [1, 2]


def test_spawn_dataloader_workers_iterate_the_whole_dataset(samples):
    # Windows and macOS start DataLoader workers with spawn: everything must pickle and be importable.
    loader = DataLoader(
        LabelMeDataset(samples, CLASSES, transforms=v2.RandomHorizontalFlip(p=1.0)),
        batch_size=2,
        num_workers=2,
        multiprocessing_context="spawn",
        collate_fn=collate_detection,
    )
    batches = list(loader)
    assert [len(images) for images, _ in batches] == [2, 1]
    labels = [target["labels"].tolist() for _, targets in batches for target in targets]
    assert labels == [[1, 2], [], [1]]
    assert all(image.dtype == torch.float32 for images, _ in batches for image in images)


def test_spawn_workers_run_the_train_recipe_notebook_04_uses():
    """Two spawn-started workers build the training pairs with the train recipe (crops, colour,
    flips), the dataset made exactly as notebook 04 makes it, on the embedded sample."""
    import windows_utils
    from maskrcnn_labelme import download

    samples = load_labelme_folder(download.SAMPLE_DIR)[:4]
    dataset = windows_utils.make_dataset(samples, ["background", "student_id"], train=True, image_size=96)
    loader = windows_utils.make_loader(dataset, batch_size=2, train=True, device=torch.device("cpu"),
                                       workers=2, seed=0)
    loader.multiprocessing_context = "spawn"
    batches = list(loader)
    assert len(batches) == 2
    for images, targets in batches:
        for image, target in zip(images, targets):
            assert image.shape == (3, 96, 96) and image.dtype == torch.float32
            assert len(target["boxes"]) == len(target["masks"]) == len(target["labels"])
            assert (target["labels"] == 1).all()
