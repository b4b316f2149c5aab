"""The model: torchvision's Mask R-CNN (ResNet-50 FPN v2), with heads sized for your classes."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
from torchvision.models.detection import MaskRCNN_ResNet50_FPN_V2_Weights, maskrcnn_resnet50_fpn_v2
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

__all__ = [
    "COCO_WEIGHTS_URL", "TRAINABLE_BACKBONE_LAYERS", "WeightsError", "build_model", "coco_weights_file",
    "load_coco_weights", "load_maskrcnn", "prepare_for_training", "replace_heads", "set_training_regions",
]


# The COCO weights: torchvision's published file, whose name ends in the first hex digits of its
# SHA-256 ("...-73cbd019.pth").
COCO_WEIGHTS_URL = MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1.url
# Backbone stages trained when fine-tuning from COCO, as torchvision does for pretrained weights:
# ResNet's stem and first stage keep their weights (they detect edges and textures, which any
# photo needs), layer2-layer4 adapt.
TRAINABLE_BACKBONE_LAYERS = ("layer2", "layer3", "layer4")


class WeightsError(RuntimeError):
    """The COCO weights file is not the published one (corrupt, cut short, or replaced)."""


def coco_weights_file() -> Path:
    """Where torchvision keeps the COCO weights once downloaded (the torch hub cache)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / COCO_WEIGHTS_URL.rsplit("/", 1)[-1]


def _published_hash_prefix() -> str:
    return re.search(r"-([0-9a-f]{6,})\.", COCO_WEIGHTS_URL.rsplit("/", 1)[-1]).group(1)


def load_coco_weights(download: bool = True) -> dict[str, torch.Tensor]:
    """The COCO state dict, checked before anything in it is read.

    torchvision unpickles its cached weights with ``weights_only=False`` and checks their hash
    only while downloading, so a file planted in the cache would run code. Here the file, from
    the cache or freshly downloaded, must match the SHA-256 prefix in torchvision's published
    file name, and is then read with ``torch.load(..., weights_only=True)``, which only accepts
    tensors and plain data. Raises FileNotFoundError (not cached, downloads off), OSError (the
    download failed) or WeightsError (a file that is not the published one).
    """
    path = coco_weights_file()
    prefix = _published_hash_prefix()
    if not path.is_file():
        if not download:
            raise FileNotFoundError(f"{path} does not exist and downloads are off")
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(COCO_WEIGHTS_URL, str(path), hash_prefix=prefix, progress=True)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    if not digest.hexdigest().startswith(prefix):
        raise WeightsError(
            f"{path} is not torchvision's published COCO weights file: its SHA-256 begins "
            f"{digest.hexdigest()[:len(prefix)]}, the published one {prefix}. It is corrupt, cut "
            "short or was replaced, and is not read. Delete it; the next run with internet access "
            f"downloads it again and checks it (or copy the genuine file from {COCO_WEIGHTS_URL})."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # matches the hash, yet unreadable: refuse rather than unpickle
        raise WeightsError(f"{path} matches the published hash but cannot be read safely "
                           f"({type(error).__name__}). Delete it and download it again.") from error


def load_maskrcnn(*, image_size: int = 512, pretrained: bool = True, download: bool = True
                  ) -> torch.nn.Module:
    """Mask R-CNN v2 with its COCO heads (91 classes): COCO weights when they can be had.

    image_size: the model's own transform resizes every input so that its sides lie in
        [min_size, max_size]; by default that is 800-1333 px, which would compute a 512 px training
        image at 800 px. Setting both to image_size runs the network at the size the data pipeline
        produces (about twice as fast on a CPU at 256 px, and no blurry upsampling).
    pretrained: start from the COCO weights (see ``load_coco_weights``) when they can be had:
        already in the torch hub cache, or downloadable when `download` is True. Otherwise a loud
        message, and every weight (backbone included) starts random, so nothing tries the network.
        A weights file that is not the published one stops with WeightsError: it is never read.
    """
    model = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None,
                                     min_size=image_size, max_size=image_size)
    if not pretrained:
        return model
    try:
        state = load_coco_weights(download)
    except WeightsError:
        raise
    except (OSError, RuntimeError) as error:  # not cached and offline, or a failed download
        print(
            "!" * 78 + "\n"
            f"NO PRETRAINED WEIGHTS: the COCO weights were asked for, but could not be had\n"
            f"({type(error).__name__}: {error}).\n"
            "The model starts from random weights. Everything still runs, but a randomly\n"
            "initialised Mask R-CNN needs far more data and epochs to learn: expect poor\n"
            "results. To fix: run this once with internet access (the weights are cached in\n"
            f"{coco_weights_file().parent}), or copy the genuine {coco_weights_file().name}\n"
            "there (it is checked against its published hash before use). In a classroom\n"
            "without internet: python3 tasks.py tutorial --kit PATH, with the instructor's\n"
            "kit (python3 tasks.py classroom-kit DIR), puts them there.\n" + "!" * 78
        )
        return model
    model.load_state_dict(state)
    for name, parameter in model.backbone.body.named_parameters():
        parameter.requires_grad_(name.startswith(TRAINABLE_BACKBONE_LAYERS))
    return model


def replace_heads(model: torch.nn.Module, num_classes: int) -> torch.nn.Module:
    """Swap the last layer of the box head and the mask head for ones with `num_classes` outputs.

    Everything before them (backbone, FPN, RPN, the v2 box head's four convolutions and linear
    layer, the mask head's four convolutions) keeps its weights: that is what fine-tuning reuses. num_classes counts
    the background (class 0), as torchvision expects.
    """
    box_features = model.roi_heads.box_predictor.cls_score.in_features  # 1024
    model.roi_heads.box_predictor = FastRCNNPredictor(box_features, num_classes)
    mask_channels = model.roi_heads.mask_predictor.conv5_mask.in_channels  # 256
    model.roi_heads.mask_predictor = MaskRCNNPredictor(mask_channels, 256, num_classes)
    return model


def build_model(
    num_classes: int, *, image_size: int = 512, pretrained: bool = True, download: bool = True
) -> torch.nn.Module:
    """Mask R-CNN (ResNet-50 FPN v2) with box and mask predictors for `num_classes` classes
    (background included): ``load_maskrcnn``, then ``replace_heads``."""
    model = load_maskrcnn(image_size=image_size, pretrained=pretrained, download=download)
    return replace_heads(model, num_classes)


def prepare_for_training(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move the model to `device`; on a CUDA GPU also to channels-last memory format.

    Channels-last (each pixel's channels side by side) lets cuDNN use its fastest convolution
    kernels for mixed precision. Measured with benchmarks/run.py on an H200, side by side in one
    process: 1.08x more training images per second (both sides with a fused AdamW). Earlier runs
    in separate processes, which favour whichever variant runs last, gave 1.07x to 1.30x on H100s
    and the H200. Not measured on CPUs and Apple GPUs, so there the model stays as it is.
    """
    if device.type == "cuda":
        return model.to(device, memory_format=torch.channels_last)
    return model.to(device)


def set_training_regions(model: torch.nn.Module, box_regions: int | None, train_proposals: int | None) -> torch.nn.Module:
    """How many regions the heads learn from per photo in training: `train_proposals` region
    proposals kept after the RPN's non-maximum suppression, of which `box_regions` are sampled
    (objects first, at most a quarter of them) to train the box head. torchvision's defaults are
    2000 and 512; the box head's work, forward and backward, grows with `box_regions`. None (a
    setting left to ``TrainSettings.resolve``, not resolved) keeps the model's number.
    Prediction is untouched (its proposal count is ``inference.set_proposals``).
    """
    if train_proposals is not None:
        model.rpn._post_nms_top_n["training"] = train_proposals
    if box_regions is not None:
        model.roi_heads.fg_bg_sampler.batch_size_per_image = box_regions
    return model
