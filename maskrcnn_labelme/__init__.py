"""Fine-tune torchvision's Mask R-CNN on LabelMe polygons: the library behind the notebook series.

One module per responsibility, in the order the notebooks need them:

- ``labelme``    read LabelMe files of any version into samples (01); ``labelme_parse``
                 checks each field of one file
- ``pixels``     decode images upright, draw shapes as masks (01, 03)
- ``targets``    masks -> boxes -> the target dict Mask R-CNN trains on (01, 03)
- ``runs``       project paths, the smoke switch, the run folder's file names (01-07)
- ``checkpoints`` atomic writes, checkpoint loading, the ``Checkpointer`` behind ``fit`` (01-07)
- ``splits``     the seeded train/val/test split (01)
- ``download``   fetch the student-ID dataset, or fall back to the embedded sample (01)
- ``devices``    pick the device and the precision, check versions (all)
- ``draw``       masks and boxes on images, training curves (01, 03, 04, 05)
- ``models``     build Mask R-CNN with new heads for your classes (02)
- ``augment``    the plan-first augmentation recipes (03)
- ``settings``   ``TrainSettings``: every training setting, by device and profile (04, command)
- ``data``       the splits' loaders, seeded by (seed, epoch) for exact resume (04, 06, command)
- ``engine``     the training step, validation loss, the loop ``fit``, the test score (04)
- ``coco_eval``  COCO box and mask AP with pycocotools (04)
- ``inference``  predictions on photos, LabelMe files from predictions (05)
- ``export``     ONNX export and the parity check against PyTorch (06, 08)
- ``artifacts``  the manifest and model settings: read, and rebuilt when missing (02-08)
- ``train``      notebook 04 as a command, on one process or many under torchrun
- ``distributed`` process group, sampler and gathering for DistributedDataParallel
- ``kit``        the offline classroom kit
- ``diagnose``   AP per class and size, confusion matrix, galleries, threshold sweep, relabelling (07)
- ``coco_export`` the split as COCO instance files
- ``figures``    the figures of a finished run, for images/ and the README
- ``cjm_pipeline`` the reference tutorial's (cj-mills') data pipeline, for comparisons (03, benchmark)

The dataset, its collate function and the loader factory live in the top-level
``windows_utils.py``, which spawn-started DataLoader workers import. Nothing is imported here, so
a worker loads only the modules it needs: write ``from maskrcnn_labelme import engine``.
"""

__version__ = "0.2.0"


def check_checkout(root: str) -> None:
    """Stop with a plain message when this package is imported from another copy of the project.

    Two clones sharing one Python environment (or an old ``pip install -e`` of another folder)
    would otherwise make a notebook run the other clone's code and write into its run folder.
    ``root`` is the project folder the notebook belongs to.
    """
    import os

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.normcase(os.path.realpath(here)) != os.path.normcase(os.path.realpath(root)):
        raise ImportError(
            f"This notebook belongs to the project in {root}, but Python imported maskrcnn_labelme "
            f"from {here}: another copy of the project, installed in this environment. Its code "
            "would run and its run folder would fill. Fix: restart the kernel (a package imported "
            f"earlier stays loaded), and run `pip install -e .` in {root} to make this copy the "
            "installed one (or use a separate virtual environment per copy)."
        )


# The oldest torchvision this series runs on: draw_bounding_boxes(fill_labels=...) arrived in 0.23
# (torch 2.8). Checked from the installed packages' metadata, so this costs no import of torch.
MIN_TORCHVISION = (0, 23)
TESTED = "torch 2.14.1 / torchvision 0.29.1, and Colab's torch 2.11 / torchvision 0.26"


def _check_versions() -> None:
    import importlib.metadata
    import re

    try:
        installed = importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:
        return  # a source build without metadata: nothing to check against
    if tuple(int(part) for part in re.findall(r"\d+", installed)[:2]) < MIN_TORCHVISION:
        raise ImportError(
            f"torchvision {installed} is too old for this tutorial, which needs torchvision "
            f"{'.'.join(map(str, MIN_TORCHVISION))} or newer (tested: {TESTED}). Fix: pip install "
            "torch==2.14.1 torchvision==0.29.1 (on Colab: pip install -U torch torchvision, then "
            "Runtime > Restart session)."
        )


_check_versions()
