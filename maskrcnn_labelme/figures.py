"""The figures of a finished run, for the README and the notebooks: what the tutorial achieves.

    python -m maskrcnn_labelme.figures --run-dir runs/student-id --out images

writes, from a run folder that notebooks 01-04 (or ``python -m maskrcnn_labelme.train``) filled:
annotated training photos, eight augmentations of one photo, the training curves, and test photos
with their annotation next to the model's prediction, plus ``about.md``, which says which machine,
epochs, weights and test scores they come from, so that nobody takes a figure for more than it is.
JPEGs at quality 85 and at most 1600 px wide keep the repository small.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
from pathlib import Path

import torch

from . import artifacts, augment, diagnose, draw, inference, runs, targets

__all__ = ["make_figures"]

MAX_WIDTH = 1600


def _save(figure, path: Path) -> Path:
    """Save a matplotlib figure; photos as a compressed JPEG at most MAX_WIDTH px wide."""
    import matplotlib.pyplot as plt
    from PIL import Image

    if path.suffix == ".png":
        figure.savefig(path, dpi=100)
    else:
        tmp = path.with_suffix(".tmp.png")
        figure.savefig(tmp, dpi=100)
        with Image.open(tmp) as image:
            image = image.convert("RGB")
            if image.width > MAX_WIDTH:
                image = image.resize((MAX_WIDTH, round(image.height * MAX_WIDTH / image.width)))
            image.save(path, quality=85, optimize=True)
        tmp.unlink()
    plt.close(figure)
    return path


def _grid(images, titles, columns: int):
    import matplotlib.pyplot as plt

    rows = -(-len(images) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles):
        ax.imshow(image.permute(1, 2, 0))
        ax.set_title(title, fontsize=10)
    figure.tight_layout()
    return figure


def make_figures(run_dir: Path, out: Path, *, photos: int = 4, smoke: bool = False,
                 note: str | None = None) -> list[Path]:
    """Write the figures of `run_dir` into `out`; returns the files written. Everything they are
    drawn from is checked first (the run's manifest, model settings, metrics and best model), so a
    mistyped or unfinished run folder writes nothing and changes nothing."""
    from torchvision.transforms.v2 import functional as TF

    run_dir = Path(run_dir)
    manifest = artifacts.load_manifest(run_dir)
    settings = artifacts.read_artifact(run_dir, runs.MODEL_SETTINGS_NAME, "02_model_setup")
    for name in (runs.METRICS_NAME, runs.BEST_MODEL_NAME):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{runs.show_path(run_dir / name)} does not exist: {runs.show_path(run_dir)} "
                                    "holds no finished training run (notebook 04 writes it). Nothing was written.")
    class_names, size = manifest["class_names"], settings["image_size"]
    out.mkdir(parents=True, exist_ok=True)
    written = []

    train = artifacts.manifest_samples(manifest, "train")
    busiest = sorted(train, key=lambda s: (-len(s.instances), s.stem))[:photos]
    drawn = []
    for sample in busiest:
        labels = [class_names.index(instance.label) for instance in sample.instances]
        image, target = targets.labelme_item(sample, labels)
        drawn.append(draw.draw_instances(TF.pil_to_tensor(image), target["masks"], target["boxes"],
                                         [class_names[i] for i in target["labels"]]))
    written.append(_save(_grid(drawn, [s.stem for s in busiest], photos), out / "dataset_sample.jpg"))

    recipe = augment.build_transforms(train=True, size=size)
    sample = busiest[0]
    labels = [class_names.index(instance.label) for instance in sample.instances]
    torch.manual_seed(0)
    draws = [recipe(sample, labels) for _ in range(8)]
    drawn = [draw.draw_instances(image, target["masks"], target["boxes"],
                                 [class_names[i] for i in target["labels"]]) for image, target in draws]
    written.append(_save(_grid(drawn, [f"draw {k + 1}" for k in range(8)], 4), out / "augmentation.jpg"))

    with open(run_dir / runs.METRICS_NAME, encoding="utf-8") as handle:
        history = [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(handle)]
    figure = draw.plot_history(history)
    written.append(_save(figure, out / "training_curves.png"))

    model, class_names = inference.load_trained_model(run_dir, smoke=smoke)
    threshold = diagnose.read_score_threshold(run_dir, default=0.5)  # notebook 05's threshold
    tests = artifacts.manifest_samples(manifest, "test")[:photos]
    panels, titles = [], []
    for sample in tests:
        photo = sample.load_image()
        truth = torch.from_numpy(sample.rasterize())
        panels.append(draw.draw_instances(TF.pil_to_tensor(photo), truth, targets.boxes_from_masks(truth),
                                          [instance.label for instance in sample.instances]))
        prediction = inference.predict(model, photo, score_threshold=threshold)
        panels.append(draw.draw_instances(
            TF.pil_to_tensor(photo), prediction["masks"], prediction["boxes"],
            [f"{class_names[l]} {s:.0%}" for l, s in zip(prediction["labels"], prediction["scores"].tolist())]))
        titles += [f"{sample.stem}: annotation", f"{sample.stem}: prediction (score >= {threshold:.2f})"]
    written.append(_save(_grid(panels, titles, 4), out / "predictions.jpg"))

    written.append(_about(run_dir, out, size, threshold, note))
    return written


def _about(run_dir: Path, out: Path, image_size: int, threshold: float, note: str | None = None) -> Path:
    """about.md: where the figures come from, in words a reader can check."""
    def read(name: str) -> dict:
        path = run_dir / name
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    trained, scores = read(runs.TRAIN_SETTINGS_NAME), read(runs.TEST_METRICS_NAME)
    device = trained.get("device", "unknown device")
    if device.startswith("cuda") and torch.cuda.is_available():
        device = f"{device} ({torch.cuda.get_device_name(0)})"
    weights = ("COCO weights asked for (offline, the model falls back to random weights with a loud "
               "message; the note below says so when it did)" if trained.get("pretrained")
               else "random weights (no COCO weights)")
    epochs = trained.get("epochs", "?")
    regions = (f"the box head trained on {trained['box_regions']} of {trained['train_proposals']} region "
               "proposals per photo, " if trained.get("box_regions") else "")
    lines = [
        "# Where these figures come from",
        "",
        f"- Run folder: `{runs.show_path(run_dir)}`, {trained.get('train_images', '?')} training photos, "
        f"{epochs} epoch{'' if epochs == 1 else 's'} at {trained.get('image_size', image_size)} px, batch "
        f"{trained.get('batch_size', '?')}, peak learning rate {trained.get('lr', '?')}, {regions}{weights}.",
        f"- Trained on: {device}; figures drawn on {platform.platform(terse=True)}.",
        "- Test split (best checkpoint, epoch {}): box AP {}, mask AP {}, mask AP50 {}.".format(
            scores.get("epoch", "?"), *(f"{scores[k]:.3f}" if k in scores else "?"
                                        for k in ("bbox_AP", "segm_AP", "segm_AP50"))),
        f"- Predictions drawn at score >= {threshold:.2f} (notebook 07's threshold for this checkpoint, else 0.5).",
        *([f"- Note: {note}"] if note else []),
        "",
        "Made with `python -m maskrcnn_labelme.figures`.",
    ]
    path = out / "about.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The figures of a finished run, for the README.")
    parser.add_argument("--run-dir", type=Path, default=None, help="default: the run notebook 01 last wrote")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the figures (default: figures/ in the run folder; the project's "
                             "images/ only when named here)")
    parser.add_argument("--note", default=None, help="a line for about.md, e.g. what the run lacked")
    args = parser.parse_args(argv)
    smoke = runs.smoke_profile()
    run_dir = args.run_dir or runs.latest_run_dir(smoke)
    try:
        written = make_figures(run_dir, args.out or Path(run_dir) / "figures", smoke=smoke, note=args.note)
    except (FileNotFoundError, ValueError) as error:  # ArtifactError is a ValueError
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    for path in written:
        print(f"{runs.show_path(path)}  {path.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
