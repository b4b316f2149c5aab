"""Cutting a dataset into training, validation and test splits, seeded and reproducible."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence

from . import labelme

__all__ = ["SPLIT_FOLDERS", "folder_splits", "missing_classes", "split_by_class", "split_stems"]


def split_stems(
    stems: Sequence[str], fractions: Mapping[str, float], seed: int
) -> dict[str, list[str]]:
    """Shuffle the file stems with a fixed seed and cut them into named splits.

    Sizes are rounded from the fractions and the first split takes the remainder, so no file is
    lost; every split gets at least one file, or a ValueError says there are too few.
    """
    if not fractions or any(f <= 0 for f in fractions.values()):
        raise ValueError(f"split fractions must be positive, got {dict(fractions)}")
    names = list(fractions)
    order = sorted(stems)
    random.Random(seed).shuffle(order)
    total = sum(fractions.values())
    sizes = {name: round(len(order) * fractions[name] / total) for name in names[1:]}
    if len(order) >= len(names):
        sizes = {name: max(1, size) for name, size in sizes.items()}
    sizes[names[0]] = len(order) - sum(sizes.values())
    if min(sizes.values()) < 1:
        raise ValueError(
            f"{len(order)} files are too few for the splits {names}: each needs at least one"
        )
    splits, start = {}, 0
    for name in names:
        splits[name] = sorted(order[start : start + sizes[name]])
        start += sizes[name]
    return splits


def split_by_class(samples: Sequence[labelme.LabelMeSample], fractions: Mapping[str, float],
                   seed: int) -> dict[str, list[str]]:
    """``split_stems``' split, with photos swapped between splits until each class is in every
    split the data allows: in the first split (training) first, then in the next ones, in order.

    A random split of few photos can leave a class out of training, and a class never trained
    on can never be found. Here, while some swap of two photos between splits makes the first
    split hold more classes, or the second more without the first losing one, and so on, the
    best such swap is made. The sizes stay those of ``split_stems``, so a split where every class
    already is everywhere (a single-class dataset, most large ones) is exactly its split; the
    same samples, fractions and seed give the same split. ``missing_classes`` says what is still
    missing where (with three photos and six classes, one photo per split cannot hold them all).
    """
    labels = {sample.key: frozenset(i.label for i in sample.instances) for sample in samples}
    splits = split_stems(list(labels), fractions, seed)
    names = list(splits)
    where = {stem: name for name, stems in splits.items() for stem in stems}
    counts = {name: Counter(label for stem in stems for label in labels[stem])
              for name, stems in splits.items()}

    def covered_after(name: str, leaving: str, coming: str) -> int:
        """How many classes split `name` holds once `leaving` has left it and `coming` arrived."""
        lost = sum(1 for label in labels[leaving] - labels[coming] if counts[name][label] == 1)
        return len(held[name]) - lost + len(labels[coming] - held[name])

    def swap(a: str, b: str) -> None:  # a and b trade places
        into, back = where[b], where[a]
        for stem, old, new in ((a, back, into), (b, into, back)):
            counts[old].subtract(labels[stem])
            counts[new].update(labels[stem])
            where[stem] = new

    position = {name: i for i, name in enumerate(names)}
    improved = True
    while improved:  # each swap makes the coverage tuple larger: this ends
        improved = False
        held = {name: {label for label, n in counts[name].items() if n > 0} for name in names}
        current = tuple(len(held[name]) for name in names)
        for name in names:
            members = sorted(stem for stem in labels if where[stem] == name)
            best = None
            for a in sorted(stem for stem in labels if where[stem] != name and labels[stem] - held[name]):
                for b in members:
                    score = list(current)
                    score[position[name]] = covered_after(name, b, a)
                    score[position[where[a]]] = covered_after(where[a], a, b)
                    if tuple(score) > max(current, best[0] if best else current):
                        best = (tuple(score), a, b)
            if best is not None:
                swap(best[1], best[2])
                improved = True
                break
    return {name: sorted(stem for stem in labels if where[stem] == name) for name in names}


def missing_classes(splits: Mapping[str, Sequence[str]], samples: Sequence[labelme.LabelMeSample]
                    ) -> dict[str, list[str]]:
    """The classes each split lacks ({split: [labels]}, only splits that lack one), for QA.

    A class missing from training cannot be learnt; one missing from validation or test cannot be
    measured. ``split_by_class`` keeps this as short as the data allows.
    """
    labels = {sample.key: {i.label for i in sample.instances} for sample in samples}
    everything = set().union(*labels.values()) if labels else set()
    missing = {name: sorted(everything - set().union(*(labels[stem] for stem in stems)))
               for name, stems in splits.items()}
    return {name: lacking for name, lacking in missing.items() if lacking}



# Folder names that say which split their files belong to (case does not matter)
SPLIT_FOLDERS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "dev": "val", "test": "test", "testing": "test"}


def folder_splits(samples: Sequence[labelme.LabelMeSample], fractions: Mapping[str, float], seed: int
                  ) -> tuple[dict[str, list[str]], list[str]] | None:
    """The split the data folder already has, when every file sits in (a folder below) a folder
    named as a split: train/, val/ (or valid/, validation/), test/. A split the folders lack is
    carved from the training files, as ``split_by_class`` would, in the proportions of
    `fractions`; the test split stays exactly the user's. Returns (splits, names of the carved
    splits), or None when the folders do not name the splits."""
    where: dict[str, str] = {}
    for sample in samples:
        parts = sample.key.split("/")
        split = SPLIT_FOLDERS.get(parts[0].lower()) if len(parts) > 1 else None
        if split is None:
            return None
        where[sample.key] = split
    given = {name: sorted(k for k, s in where.items() if s == name) for name in ("train", "val", "test")}
    if not given["train"]:
        return None
    carved = [name for name in ("val", "test") if not given[name]]
    if carved:
        train = [s for s in samples if where[s.key] == "train"]
        parts = split_by_class(train, {"train": fractions["train"], **{n: fractions[n] for n in carved}}, seed)
        given.update(parts)
    return given, carved
