"""Diagnosis: where a trained model fails, which score threshold to use, and what to relabel first.

Everything is measured at each photo's own size, on the predictions ``inference.predict`` makes
(the ones notebook 05 shows), against the annotations as the loader draws them. The matching of
detections to annotations is pycocotools' own (``coco_eval.coco_evaluator``): greedy by score, a
hit at IoU >= 0.5, "__ignore__" regions as crowds where a detection is neither right nor wrong.
Every table here reads its results; nothing of COCO's evaluation is re-implemented.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from . import checkpoints, coco_eval, inference, pixels, runs, targets

if TYPE_CHECKING:
    from .labelme import LabelMeSample

__all__ = [
    "QUEUE_NAME", "SCORE_THRESHOLD_NAME", "SIZES", "Diagnosis", "draw_gallery", "draw_record", "evaluate",
    "pick_threshold", "plot_confusion", "plot_sweep", "predict_records", "read_score_threshold",
    "threshold_grid", "uncertainty_table", "unlabelled_images", "write_relabel_queue", "write_score_threshold",
]

SCORE_THRESHOLD_NAME = "score_threshold.json"  # 07: the score threshold notebook 05 uses
QUEUE_NAME = "relabel_queue.csv"               # 07: the photos to look at first in LabelMe
# COCO's object sizes, by area in the photo's pixels: small < 32 x 32 <= medium < 96 x 96 <= large
SIZES = {"small": (0, 32**2), "medium": (32**2, 96**2), "large": (96**2, math.inf)}


def _detections(model: torch.nn.Module, image, device, min_score: float, mask_threshold: float
                ) -> list[dict[str, Any]]:
    """The model's detections scoring at least `min_score`, at the photo's size, in COCO's format.

    The model's own floor (torchvision drops scores under 0.05) is set to `min_score` meanwhile,
    so that a lower `min_score` really sees lower scores.
    """
    heads = getattr(model, "roi_heads", None)
    floor = getattr(heads, "score_thresh", None)
    if floor is not None:
        heads.score_thresh = min_score
    try:
        prediction = inference.predict(model, image, device, score_threshold=min_score,
                                       mask_threshold=mask_threshold)
    finally:
        if floor is not None:
            heads.score_thresh = floor
    return [{**coco_eval.coco_annotation(mask, box, label), "score": score}
            for mask, box, label, score in zip(prediction["masks"].numpy(), prediction["boxes"].tolist(),
                                               prediction["labels"].tolist(), prediction["scores"].tolist())]


def _annotations(masks: np.ndarray, labels: Sequence[int]) -> list[dict[str, Any]]:
    boxes = targets.boxes_from_masks(torch.from_numpy(masks)).tolist()
    return [coco_eval.coco_annotation(mask, box, label) for mask, box, label in zip(masks, boxes, labels)]


def predict_records(model: torch.nn.Module, samples: Sequence[LabelMeSample], class_names: Sequence[str],
                    device: torch.device | str = "cpu", *, split: str | None = None, min_score: float = 0.05,
                    mask_threshold: float = 0.5, progress: bool = True) -> list[dict[str, Any]]:
    """One record per sample: its annotations ("truths"), its "__ignore__" regions ("crowds") and
    the model's detections scoring at least `min_score`, all at the photo's own size, in COCO's
    format (run-length encoded masks), with the file's stem, split and paths."""
    from tqdm.auto import tqdm

    index = {name: i for i, name in enumerate(class_names) if i > 0}
    records = []
    for sample in tqdm(samples, desc=f"predicting {split or ''}".strip(), disable=not progress):
        unknown = sorted({inst.label for inst in sample.instances} - set(index))
        if unknown:
            raise ValueError(f"{sample.json_path}: labels {unknown} are not among the model's classes "
                             f"{list(class_names[1:])}")
        image = sample.load_image()
        records.append({
            "stem": sample.stem, "split": split, "json_path": str(sample.json_path),
            "image_path": None if sample.image_path is None else str(sample.image_path),
            "height": sample.height, "width": sample.width,
            "truths": _annotations(sample.rasterize(), [index[inst.label] for inst in sample.instances]),
            "crowds": _annotations(sample.rasterize_ignored(), [0] * len(sample.ignore_regions)),
            "detections": _detections(model, image, device, min_score, mask_threshold),
        })
    return records


def _size(area: float) -> str:
    return next(name for name, (low, high) in SIZES.items() if low <= area < high)


def _iou_matrices(evaluator, iou_type: str) -> dict[int, np.ndarray]:
    """Per image id: IoU of every detection (rows, by id) with every non-crowd annotation."""
    from pycocotools import mask as mask_utils

    gt, dt = evaluator.cocoGt, evaluator.cocoDt
    matrices = {}
    for image_id in gt.getImgIds():
        truths = [gt.anns[i] for i in sorted(gt.getAnnIds(imgIds=[image_id])) if not gt.anns[i]["iscrowd"]]
        dets = [dt.anns[i] for i in sorted(dt.getAnnIds(imgIds=[image_id]))]
        if not truths or not dets:
            matrices[image_id] = np.zeros((len(dets), len(truths)))
            continue
        if iou_type == "bbox":
            shapes = [d["bbox"] for d in dets], [t["bbox"] for t in truths]
        else:
            shapes = [dt.annToRLE(d) for d in dets], [gt.annToRLE(t) for t in truths]
        matrices[image_id] = np.asarray(mask_utils.iou(*shapes, [0] * len(truths))).reshape(len(dets), len(truths))
    return matrices


def _match_tables(evaluator, iou_threshold: float, ious: Mapping[int, np.ndarray]
                  ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """pycocotools' matching at one IoU threshold, over all areas, as two tables.

    detections: image (record index), detection (index in the record), label, score, truth (the
    matched annotation's index, -1 if none), crowd (matched an ignore region), iou (with the
    matched annotation), best_iou / best_truth (the most overlapping annotation of any class).
    truths: image, truth, label, area, size, detection (the matching detection, -1), score.
    """
    params = evaluator.params
    level = np.flatnonzero(np.isclose(params.iouThrs, iou_threshold))
    if not len(level):
        raise ValueError(f"IoU threshold {iou_threshold} is not among COCO's {list(params.iouThrs)}")
    gt, dt = evaluator.cocoGt, evaluator.cocoDt
    truth_at, det_at = {}, {}  # annotation id -> (record index, index within the record)
    for image_id in gt.getImgIds():
        plain = [i for i in sorted(gt.getAnnIds(imgIds=[image_id])) if not gt.anns[i]["iscrowd"]]
        truth_at.update({ann: (image_id - 1, k) for k, ann in enumerate(plain)})
        det_at.update({ann: (image_id - 1, k) for k, ann in enumerate(sorted(dt.getAnnIds(imgIds=[image_id])))})
    everything = list(params.areaRng[params.areaRngLbl.index("all")])
    det_match, truth_match = {}, {}
    for entry in evaluator.evalImgs:
        if entry is None or list(entry["aRng"]) != everything:
            continue
        for det, matched, ignored in zip(entry["dtIds"], entry["dtMatches"][level[0]], entry["dtIgnore"][level[0]]):
            det_match[det] = (int(matched), bool(ignored))
        for truth, matched, ignored in zip(entry["gtIds"], entry["gtMatches"][level[0]], entry["gtIgnore"]):
            if not ignored:
                truth_match[truth] = int(matched)
    det_rows = []
    for det, (matched, crowd) in det_match.items():
        image, k = det_at[det]
        row = ious[image + 1][k]
        truth = truth_at[matched][1] if matched and not crowd else -1
        det_rows.append({"image": image, "detection": k, "label": dt.anns[det]["category_id"],
                         "score": dt.anns[det]["score"], "truth": truth, "crowd": crowd,
                         "iou": row[truth] if truth >= 0 else np.nan,
                         "best_iou": row.max() if row.size else 0.0,
                         "best_truth": int(row.argmax()) if row.size else -1})
    truth_rows = []
    for truth, image_k in truth_at.items():
        matched = truth_match.get(truth, 0)
        truth_rows.append({"image": image_k[0], "truth": image_k[1], "label": gt.anns[truth]["category_id"],
                           "area": gt.anns[truth]["area"], "size": _size(gt.anns[truth]["area"]),
                           "detection": det_at[matched][1] if matched else -1,
                           "score": dt.anns[matched]["score"] if matched else np.nan})
    det_columns = ["image", "detection", "label", "score", "truth", "crowd", "iou", "best_iou", "best_truth"]
    truth_columns = ["image", "truth", "label", "area", "size", "detection", "score"]
    return (pd.DataFrame(det_rows, columns=det_columns).sort_values(["image", "detection"], ignore_index=True),
            pd.DataFrame(truth_rows, columns=truth_columns).sort_values(["image", "truth"], ignore_index=True))


def evaluate(records: Sequence[dict[str, Any]], class_names: Sequence[str], *, iou_type: str = "segm",
             iou_threshold: float = 0.5) -> Diagnosis:
    """Evaluate the records twice with pycocotools: by class (AP, hits and misses) and across
    classes (which class a detection was mistaken for)."""
    by_class = coco_eval.coco_evaluator(records, class_names, iou_type)
    any_class = coco_eval.coco_evaluator(records, class_names, iou_type, use_cats=False)
    ious = _iou_matrices(by_class, iou_type)
    return Diagnosis(list(records), list(class_names), iou_type, iou_threshold, by_class,
                     *_match_tables(by_class, iou_threshold, ious), *_match_tables(any_class, iou_threshold, ious))


@dataclass
class Diagnosis:
    """The records of a split and pycocotools' evaluation of them; each method is one view.

    ``detections`` and ``truths`` hold the matching within each class (hits, false positives,
    misses), ``any_detections`` and ``any_truths`` the matching across classes (confusions).
    """

    records: list[dict[str, Any]]
    class_names: list[str]
    iou_type: str
    iou_threshold: float
    evaluator: Any = field(repr=False)  # COCOeval by class
    detections: pd.DataFrame = field(repr=False)
    truths: pd.DataFrame = field(repr=False)
    any_detections: pd.DataFrame = field(repr=False)
    any_truths: pd.DataFrame = field(repr=False)

    def __post_init__(self) -> None:
        self._across = self.any_detections.set_index(["image", "detection"])
        self._truth_label = self.any_truths.set_index(["image", "truth"])["label"]

    def ap_table(self) -> pd.DataFrame:
        """AP per class and per size, read from COCOeval's precision array (IoU threshold x recall
        x class x area x max detections), averaged exactly as COCOeval.summarize averages it;
        NaN where there is nothing of that class and size. The last row is COCO's headline."""
        precision, params = self.evaluator.eval["precision"], self.evaluator.params
        area = {name: params.areaRngLbl.index(name) for name in ("all", *SIZES)}
        at = {f"AP{round(100 * iou)}": np.flatnonzero(np.isclose(params.iouThrs, iou))[0] for iou in (0.5, 0.75)}

        def mean(values: np.ndarray) -> float:
            values = values[values > -1]
            return float(values.mean()) if values.size else np.nan

        rows = {}
        for name, k in [*((self.class_names[c], [i]) for i, c in enumerate(params.catIds)),
                        ("all classes", slice(None))]:
            rows[name] = {"AP": mean(precision[:, :, k, area["all"], -1]),
                          **{key: mean(precision[t, :, k, area["all"], -1]) for key, t in at.items()},
                          **{f"AP {size}": mean(precision[:, :, k, area[size], -1]) for size in SIZES}}
        return pd.DataFrame.from_dict(rows, orient="index")

    def instance_counts(self) -> pd.DataFrame:
        """Annotated instances per class and COCO size: how much each AP cell rests on."""
        counts = pd.crosstab(pd.Categorical([self.class_names[i] for i in self.truths["label"]], self.class_names[1:]),
                             pd.Categorical(self.truths["size"], list(SIZES)), dropna=False)
        counts["all"] = counts.sum(axis=1)
        return counts.rename_axis(index="class", columns="size").astype(int)

    @staticmethod
    def _found(truths: pd.DataFrame, threshold: float) -> pd.Series:
        return (truths["detection"] >= 0) & (truths["score"] >= threshold)

    def _kept(self, threshold: float, across: bool = True) -> pd.DataFrame:
        """Detections scoring >= `threshold`, those inside ignore regions left out."""
        dets = self.any_detections if across else self.detections
        return dets[(dets["score"] >= threshold) & ~dets["crowd"]]

    def confusion(self, threshold: float) -> pd.DataFrame:
        """Counts at IoU >= iou_threshold of the detections scoring >= `threshold`, matched across
        classes: rows are what was annotated, columns what was predicted. The background row holds
        detections of nothing annotated (false positives), the background column annotations
        nobody found (misses); detections inside ignore regions are left out."""
        matrix = np.zeros((len(self.class_names),) * 2, dtype=int)
        for det in self._kept(threshold).itertuples():
            matrix[self._truth_label[det.image, det.truth] if det.truth >= 0 else 0, det.label] += 1
        for truth in self.any_truths[~self._found(self.any_truths, threshold)].itertuples():
            matrix[truth.label, 0] += 1
        return pd.DataFrame(matrix, index=pd.Index(self.class_names, name="annotated"),
                            columns=pd.Index(self.class_names, name="predicted"))

    def sweep(self, thresholds: Sequence[float]) -> pd.DataFrame:
        """Precision, recall and F1 of each class (and of all together) at each score threshold,
        from pycocotools' matching within the class: a detection at or above the threshold is a
        true positive when matched, a false positive otherwise (unless inside an ignore region)."""
        rows = []
        for label, name in [*enumerate(self.class_names[1:], start=1), (None, "all classes")]:
            dets, truths = self._kept(0, across=False), self.truths
            if label is not None:
                dets, truths = dets[dets["label"] == label], truths[truths["label"] == label]
            for threshold in thresholds:
                kept = dets[dets["score"] >= threshold]
                tp = int((kept["truth"] >= 0).sum())
                fp, fn = len(kept) - tp, len(truths) - tp
                rows.append({"class": name, "threshold": float(threshold), "tp": tp, "fp": fp, "fn": fn,
                             "precision": tp / (tp + fp) if tp + fp else np.nan,
                             "recall": tp / len(truths) if len(truths) else np.nan,
                             "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else np.nan})
        return pd.DataFrame(rows)

    def _why_wrong(self, image: int, detection: int) -> str:
        """Why a detection matched no annotation of its class, from the matching across classes."""
        det = self._across.loc[(image, detection)]
        if det["truth"] >= 0 and self._truth_label[image, int(det["truth"])] != det["label"]:
            return f"class swap: annotated {self.class_names[self._truth_label[image, int(det['truth'])]]}"
        if det["best_iou"] < 0.1:
            return "background: nothing annotated there"
        near = self.class_names[self._truth_label[image, int(det["best_truth"])]]
        if det["best_iou"] >= self.iou_threshold:
            return f"duplicate of a found {near}"
        return f"poor outline: IoU {det['best_iou']:.2f} with a {near}"

    def false_positives(self, threshold: float, count: int | None = None) -> pd.DataFrame:
        """The detections scoring >= `threshold` that match no annotation of their class (ignore
        regions aside), most confident first, with why: a class swap, a duplicate, a poor
        outline, or nothing annotated there."""
        wrong = self._kept(threshold, across=False)
        wrong = wrong[wrong["truth"] < 0].sort_values(["score", "image"], ascending=[False, True]).head(count)
        return self._describe(wrong, "false positive",
                              [self._why_wrong(row.image, row.detection) for row in wrong.itertuples()])

    def misses(self, threshold: float, count: int | None = None) -> pd.DataFrame:
        """The annotations no detection of their class scoring >= `threshold` found, largest
        first, with why: found as another class, or not found at all."""
        missed = self.truths[~self._found(self.truths, threshold)]
        missed = missed.sort_values(["area", "image"], ascending=[False, True]).head(count)
        across = self.any_truths.set_index(["image", "truth"])
        why = []
        for row in missed.itertuples():
            other = across.loc[(row.image, row.truth)]
            found = other["detection"] >= 0 and other["score"] >= threshold
            label = self._across.loc[(row.image, int(other["detection"])), "label"] if found else 0
            why.append(f"found as {self.class_names[label]} ({other['score']:.2f})" if found else "not found")
        return self._describe(missed, "miss", why)

    def _describe(self, table: pd.DataFrame, what: str, why: list[str]) -> pd.DataFrame:
        return table.assign(what=what, why=why, stem=[self.records[i]["stem"] for i in table["image"]],
                            cls=[self.class_names[i] for i in table["label"]]).reset_index(drop=True)

    def negatives(self, threshold: float) -> pd.DataFrame:
        """False positives on each negative image (one without annotations) at `threshold`."""
        scores = self._kept(threshold).groupby("image")["score"]
        counts, top = scores.count(), scores.max()
        rows = [{"stem": record["stem"], "false positives": int(counts.get(i, 0)), "top score": top.get(i, np.nan)}
                for i, record in enumerate(self.records) if not record["truths"]]
        return pd.DataFrame(rows, columns=["stem", "false positives", "top score"])

    def relabel_queue(self, threshold: float) -> pd.DataFrame:
        """The annotated images, most disagreement between model and annotation first.

        Matched across classes at `threshold`: each missed annotation counts 1, each confident
        extra detection its score, each class swap 1, each match 1 - its IoU (a loose outline on
        either side). Images that agree completely are left out.
        """
        kept = self._kept(threshold)
        kept = kept.astype({"score": float, "iou": float})  # an empty table's columns are objects
        truths = self.any_truths[~self._found(self.any_truths, threshold)]
        rows = []
        for i, record in enumerate(self.records):
            mine, missed = kept[kept["image"] == i], truths[truths["image"] == i]
            matched, extra = mine[mine["truth"] >= 0], mine[mine["truth"] < 0]
            swaps = [(self.class_names[self._truth_label[i, m.truth]], self.class_names[m.label])
                     for m in matched.itertuples() if self._truth_label[i, m.truth] != m.label]
            score = len(missed) + extra["score"].sum() + len(swaps) + (1 - matched["iou"]).sum()
            if score <= 0:
                continue
            names = lambda table: [self.class_names[c] for c in table["label"]]
            top = [f"{name} {s:.2f}" for name, s in zip(names(extra.nlargest(3, "score")), extra["score"].nlargest(3))]
            details = ([f"{len(missed)} missed ({', '.join(names(missed))})"] if len(missed) else []) + (
                [f"{len(extra)} extra ({', '.join(top)}{', ...' if len(extra) > 3 else ''})"] if len(extra) else [])
            details += [f"class swap: annotated {a}, predicted {b}" for a, b in swaps]
            details += [f"lowest IoU {matched['iou'].min():.2f}"] if len(matched) else []
            rows.append({"stem": record["stem"], "split": record["split"], "json": record["json_path"],
                         "image": record["image_path"], "disagreement": round(float(score), 3),
                         "missed": len(missed), "extra": len(extra), "class swaps": len(swaps),
                         "lowest IoU": matched["iou"].min() if len(matched) else np.nan, "details": "; ".join(details)})
        table = pd.DataFrame(rows, columns=["stem", "split", "json", "image", "disagreement", "missed", "extra",
                                            "class swaps", "lowest IoU", "details"])
        return table.sort_values(["disagreement", "stem"], ascending=[False, True], ignore_index=True)


def threshold_grid(min_score: float = 0.05, step: float = 0.05) -> list[float]:
    """Score thresholds to try: `min_score`, then every `step` up to 0.95."""
    grid = np.round(np.arange(step, 1.0 - 1e-9, step), 4)
    return sorted({float(min_score), *(float(t) for t in grid if t >= min_score)})


def pick_threshold(sweep: pd.DataFrame, default: float = 0.5) -> dict[str, Any]:
    """The threshold with the best F1 of all classes together (micro: every detection and
    annotation counts once), the middle one where several tie; each class's own best beside it.

    Where nothing was found at any threshold (F1 0 or undefined), `default` is kept and the
    reason says so: a threshold cannot be chosen from a model that finds nothing.
    """
    def best(rows: pd.DataFrame) -> dict[str, Any] | None:
        rows = rows[rows["f1"] > 0]
        if rows.empty:
            return None
        tied = rows[np.isclose(rows["f1"], rows["f1"].max())].sort_values("threshold")
        row = tied.iloc[(len(tied) - 1) // 2]
        return {"score_threshold": round(float(row["threshold"]), 4),
                **{key: round(float(row[key]), 4) for key in ("precision", "recall", "f1")}}

    overall = best(sweep[sweep["class"] == "all classes"])
    per_class = {name: best(rows) for name, rows in sweep[sweep["class"] != "all classes"].groupby("class", sort=False)}
    if overall is None:
        return {"score_threshold": default, "precision": None, "recall": None, "f1": None,
                "reason": f"no detection matched an annotation at any threshold tried: kept {default}",
                "per_class": per_class}
    return {**overall, "reason": "best F1 of all classes together", "per_class": per_class}


def _digest(run_dir: os.PathLike | str, checkpoint: os.PathLike | str | None) -> str | None:
    """The first 16 hex digits of the checkpoint's SHA-256 (the run's best_model.pt by default)."""
    import hashlib

    from .inference import checkpoint_file

    try:
        path = checkpoint_file(run_dir, checkpoint)
    except (FileNotFoundError, ValueError):
        return None
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def write_score_threshold(run_dir: os.PathLike | str, choice: Mapping[str, Any], *,
                          checkpoint: os.PathLike | str | None = None, **about: Any) -> Path:
    """Write the chosen threshold to ``score_threshold.json`` in the run folder (for notebook
    05), with how it was chosen (`about`: the split, the IoU, ...) and which checkpoint it fits."""
    return checkpoints.write_json_atomic(Path(run_dir) / SCORE_THRESHOLD_NAME,
                                  {**choice, **about, "checkpoint_sha256": _digest(run_dir, checkpoint)})


def read_score_threshold(run_dir: os.PathLike | str, default: float = 0.5, *,
                         checkpoint: os.PathLike | str | None = None) -> float:
    """Notebook 07's score threshold for this run's model (``score_threshold.json``), or `default`
    when there is none, or when it was chosen for another checkpoint than the one there now (the
    model was trained again): a warning says so."""
    import warnings

    path = Path(run_dir) / SCORE_THRESHOLD_NAME
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        value = saved["score_threshold"]
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return default
    if saved.get("checkpoint_sha256") != _digest(run_dir, checkpoint):
        warnings.warn(f"{runs.show_path(path)} was written for another checkpoint (the model was "
                      f"trained again): using {default}. Run notebook 07 again to choose anew.", stacklevel=2)
        return default
    return float(value) if isinstance(value, (int, float)) and 0 <= value <= 1 else default


def plot_confusion(matrix: pd.DataFrame, title: str = "Confusion matrix"):
    """The confusion matrix as a figure, counts written in the cells."""
    import matplotlib.pyplot as plt

    size = len(matrix)
    fig, ax = plt.subplots(figsize=(1.2 * size + 2.5, 1.0 * size + 1.8))
    ax.imshow(matrix.to_numpy(), cmap="Blues")
    ax.set_xticks(range(size), matrix.columns, rotation=30, ha="right")
    ax.set_yticks(range(size), matrix.index)
    ax.set(xlabel="predicted (background: missed)", ylabel="annotated (background: false positive)",
           title=title)
    top = max(1, matrix.to_numpy().max())
    for (row, column), count in np.ndenumerate(matrix.to_numpy()):
        if row or column:
            ax.text(column, row, str(count), ha="center", va="center",
                    color="white" if count > top / 2 else "black")
    fig.tight_layout()
    return fig


def plot_sweep(sweep: pd.DataFrame, chosen: float | None = None):
    """Precision, recall and F1 against the score threshold, one panel per class and one for all."""
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(sweep["class"]))
    columns = min(4, len(names))
    rows = math.ceil(len(names) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        part = sweep[sweep["class"] == name]
        for key, style in (("precision", "o-"), ("recall", "s-"), ("f1", "^-")):
            ax.plot(part["threshold"], part[key], style, markersize=3, label=key)
        if chosen is not None:
            ax.axvline(chosen, color="gray", linestyle="--", label=f"chosen {chosen:g}")
        ax.set(title=name, xlabel="score threshold", ylim=(-0.02, 1.02), xlim=(0, 1))
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def _drawn(image, annotations: Sequence[dict[str, Any]], names: Sequence[str],
           colors: Sequence[Sequence[int]]) -> torch.Tensor:
    """The photo (a PIL image) with COCO-format annotations drawn on it: (3, H, W) uint8."""
    from pycocotools import mask as mask_utils
    from torchvision.transforms.v2 import functional as TF

    from .draw import draw_instances

    masks = torch.zeros((0, image.height, image.width), dtype=torch.bool)
    if annotations:
        masks = torch.from_numpy(np.stack([mask_utils.decode(a["segmentation"]) for a in annotations]) > 0)
    return draw_instances(TF.pil_to_tensor(image), masks, targets.boxes_from_masks(masks), names, colors)


def draw_record(record: Mapping[str, Any], image, class_names: Sequence[str], colors: Sequence[Sequence[int]],
                threshold: float, most: int = 25) -> tuple[torch.Tensor, torch.Tensor]:
    """A record's photo twice, as (3, H, W) uint8 tensors: with its annotations, and with its
    detections scoring at least `threshold`, the `most` best (in their class colours)."""
    truths = record["truths"]
    dets = sorted((d for d in record["detections"] if d["score"] >= threshold), key=lambda d: -d["score"])[:most]
    return (_drawn(image, truths, [class_names[t["category_id"]] for t in truths],
                   [colors[t["category_id"] - 1] for t in truths]),
            _drawn(image, dets, [f"{class_names[d['category_id']]} {d['score']:.2f}" for d in dets],
                   [colors[d["category_id"] - 1] for d in dets]))


def draw_gallery(diagnosis: Diagnosis, table: pd.DataFrame, samples: Sequence[LabelMeSample],
                 colors: Sequence[Sequence[int]], *, columns: int = 3, title: str = ""):
    """One panel per row of ``Diagnosis.false_positives`` or ``misses``: the photo with its
    annotations in their class colours and the detection (or the missed annotation) in red."""
    import matplotlib.pyplot as plt

    if table.empty:
        print(f"{title or 'gallery'}: nothing to show")
        return None
    columns = min(columns, len(table))
    fig, axes = plt.subplots(math.ceil(len(table) / columns), columns, figsize=(4.5 * columns,
                             4.2 * math.ceil(len(table) / columns)), squeeze=False)
    names = diagnosis.class_names
    for ax, row in zip(axes.flat, table.itertuples()):
        record = diagnosis.records[row.image]
        missed = row.what == "miss"
        shown = [t for k, t in enumerate(record["truths"]) if not (missed and k == row.truth)]
        focus = record["truths"][row.truth] if missed else record["detections"][row.detection]
        drawn = _drawn(samples[row.image].load_image(), [*shown, focus],
                       [names[t["category_id"]] for t in shown] + ["missed" if missed else "detection"],
                       [colors[t["category_id"] - 1] for t in shown] + [(255, 0, 0)])
        ax.imshow(drawn.permute(1, 2, 0).numpy())
        caption = f"missed {row.cls}" if missed else f"{row.cls} {row.score:.2f}"
        ax.set_title(f"{record['stem']}\n{caption}: {row.why}", fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def unlabelled_images(folder: os.PathLike | str, samples: Sequence[LabelMeSample] = ()) -> list[Path]:
    """The photos of `folder` without a LabelMe file: no JSON of the same name beside them, and
    not the image of any of `samples` (a JSON may name its image differently)."""
    folder = Path(folder)
    used = {Path(s.image_path).resolve() for s in samples if s.image_path is not None}
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in pixels.IMAGE_SUFFIXES and p.is_file()
                  and not p.with_suffix(".json").is_file() and p.resolve() not in used)


def _entropy_bits(score: float) -> float:
    """How undecided a score is: 1 bit at 0.5, 0 at 0 or 1 (binary entropy)."""
    score = min(max(score, 1e-12), 1 - 1e-12)
    return -(score * math.log2(score) + (1 - score) * math.log2(1 - score))


def uncertainty_table(model: torch.nn.Module, images: Sequence[os.PathLike | str], device="cpu", *,
                      min_score: float = 0.05, unsure: tuple[float, float] = (0.2, 0.8),
                      progress: bool = True) -> pd.DataFrame:
    """Photos without annotations, the ones the model is least sure about first.

    Uncertainty is the sum, over the detections scoring at least `min_score`, of how undecided
    each score is (its binary entropy: 1 bit at 0.5); "unsure" counts the scores within `unsure`.
    A photo full of half-believed detections teaches the model more, once annotated, than one it
    already gets right.
    """
    from tqdm.auto import tqdm

    rows = []
    for path in tqdm([Path(p) for p in images], desc="uncertainty", disable=not progress):
        scores = [d["score"] for d in _detections(model, pixels.open_rgb(path), device, min_score, 0.5)]
        rows.append({"image": str(path), "detections": len(scores),
                     "unsure": sum(unsure[0] <= s <= unsure[1] for s in scores),
                     "uncertainty": round(sum(map(_entropy_bits, scores)), 3)})
    table = pd.DataFrame(rows, columns=["image", "detections", "unsure", "uncertainty"])
    return table.sort_values(["uncertainty", "image"], ascending=[False, True], ignore_index=True)


def write_relabel_queue(path: os.PathLike | str, annotated: pd.DataFrame, unlabelled: pd.DataFrame,
                        prefilled: Mapping[str, os.PathLike | str] | None = None) -> pd.DataFrame:
    """The work list for LabelMe, as a CSV file: first the annotated photos where model and
    annotation disagree most (``Diagnosis.relabel_queue``), then the unlabelled photos the model
    is least sure about (``uncertainty_table``), each with the file to open.

    `prefilled` maps an unlabelled photo to the LabelMe file of its predictions
    (``inference.predict_folder`` writes them); without one, the photo itself is to open.
    """
    prefilled = {str(k): str(v) for k, v in (prefilled or {}).items()}
    rows = [{"task": "check the annotation", "open in LabelMe": row.json, "image": row.image,
             "split": row.split, "score": row.disagreement, "details": row.details}
            for row in annotated.itertuples()]
    rows += [{"task": "annotate (predictions pre-filled)" if row.image in prefilled else "annotate",
              "open in LabelMe": prefilled.get(row.image, row.image), "image": row.image, "split": None,
              "score": row.uncertainty, "details": f"{row.detections} detections, {row.unsure} unsure"}
             for row in unlabelled.itertuples()]
    table = pd.DataFrame(rows, columns=["task", "open in LabelMe", "image", "split", "score", "details"])
    table.insert(0, "priority", range(1, len(table) + 1))
    checkpoints.write_text_atomic(path, table.to_csv(index=False))
    return table
