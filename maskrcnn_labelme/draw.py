"""Drawing: masks, boxes and labels on an image, and the training curves."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch

__all__ = ["draw_instances", "instance_colors", "plot_history"]


def _label_font() -> str | None:
    """A TrueType font that ships with matplotlib, so labels are readable without a download."""
    try:
        from matplotlib import font_manager

        return font_manager.findfont("DejaVu Sans", fallback_to_default=True)
    except Exception:  # drawing still works with PIL's small built-in font
        return None


def instance_colors(image: torch.Tensor, count: int, *, seed: int = 0, dominant: int = 4
                    ) -> list[tuple[int, int, int]]:
    """`count` colours, one per instance, as far from each other and from the photo's own
    `dominant` colours (and from black and white) as distinctipy can place them.

    One colour per class would paint two overlapping cards alike, and a fixed green would vanish on
    a green card. The photo's dominant colours come from Pillow's quantizer on a thumbnail. The
    same photo and count give the same colours (seeded).
    """
    import distinctipy
    from torchvision.transforms.v2 import functional as F

    if count == 0:
        return []
    thumbnail = F.to_pil_image(F.to_dtype(torch.as_tensor(image), torch.uint8, scale=True))
    thumbnail = thumbnail.convert("RGB").resize((64, 64))
    palette = thumbnail.quantize(colors=dominant).getpalette()[: 3 * dominant]
    exclude = [tuple(v / 255 for v in palette[i : i + 3]) for i in range(0, len(palette), 3)]
    picked = distinctipy.get_colors(count, exclude_colors=[*exclude, (0, 0, 0), (1, 1, 1)], rng=seed)
    return [tuple(round(255 * c) for c in rgb) for rgb in picked]


def draw_instances(
    image: torch.Tensor,
    masks: torch.Tensor,
    boxes: torch.Tensor,
    labels: Sequence[str],
    colors: Sequence[Sequence[int]] | None = None,
    alpha: float = 0.4,
) -> torch.Tensor:
    """Overlay masks, boxes and label texts on an image; returns a uint8 (3, H, W) tensor.

    `image` may be uint8 or float in [0, 1]; `colors` has one RGB tuple per instance, by default
    ``instance_colors``: distinct from each other and from the photo.
    """
    from torchvision.transforms.v2 import functional as F
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    image = F.to_dtype(torch.as_tensor(image), torch.uint8, scale=True)
    if colors is None:
        colors = instance_colors(image, len(labels))
    colors = [tuple(int(c) for c in color) for color in colors]
    if len(labels):
        image = draw_segmentation_masks(image, masks.bool(), alpha=alpha, colors=colors)
        font_size = max(12, round(min(image.shape[-2:]) / 24))
        # label text on a filled tag in the box colour, black or white, whichever reads better
        text_colors = [(0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)
                       for r, g, b in colors]
        image = draw_bounding_boxes(
            image, boxes, labels=list(labels), colors=colors, width=2, font=_label_font(),
            font_size=font_size, fill_labels=True, label_colors=text_colors,
        )
    return image


def plot_history(history: Sequence[Mapping[str, float]], path: os.PathLike | str | None = None):
    """Loss curves and validation AP per epoch, saved to `path` when given."""
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.5))
    left.plot(epochs, [row["train_loss"] for row in history], "o-", label="train loss")
    left.plot(epochs, [row["val_loss"] for row in history], "o-", label="validation loss")
    left.set(xlabel="epoch", ylabel="loss", title="Losses")
    left.legend()
    for key, style in (("bbox_AP", "o-"), ("segm_AP", "s-"), ("segm_AP50", "^--")):
        points = [(row["epoch"], row[key]) for row in history if row.get(key, -1) >= 0]
        if points:
            right.plot(*zip(*points), style, label=key.replace("_", " "))
    right.set(xlabel="epoch", ylabel="AP", ylim=(0, 1), title="Validation AP (COCO)")
    right.legend()
    for axis in (left, right):
        axis.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig

