"""Splits that serve every class (splits.split_by_class) and the QA statement of what each split
lacks (splits.missing_classes), on synthetic LabelMe folders and the embedded sample."""

from __future__ import annotations

import pytest
from labelme_fixtures import square, write_labelme

from maskrcnn_labelme import artifacts, download, labelme, splits

FRACTIONS = artifacts.SPLIT_FRACTIONS  # notebook 01's 0.7 / 0.15 / 0.15


def folder(tmp_path, photos: dict[str, list[str]]):
    """One LabelMe file per photo, one small square per label."""
    for name, labels in photos.items():
        write_labelme(tmp_path, [square(label, 2 + 6 * i, 2, 6 + 6 * i, 10) for i, label in enumerate(labels)],
                      name=name)
    return labelme.load_labelme_folder(tmp_path)


def test_three_photos_six_classes_put_the_most_classes_in_training(tmp_path):
    """LabelMe's own example folder has three photos and six classes: one photo per split, so
    training can hold at most one photo's classes. It gets the photo with the most, and the QA
    statement names what each split lacks; a plain random split picks any photo."""
    samples = folder(tmp_path, {"2011_000003": ["person", "bottle"], "2011_000006": ["person", "chair", "sofa"],
                                "2011_000025": ["bus", "car"]})
    plain_train = {splits.split_stems([s.stem for s in samples], FRACTIONS, seed)["train"][0] for seed in range(10)}
    assert len(plain_train) > 1  # the plain split varies with the seed
    for seed in range(10):
        split = splits.split_by_class(samples, FRACTIONS, seed)
        assert split["train"] == ["2011_000006"]
        assert sorted(stem for stems in split.values() for stem in stems) == sorted(s.stem for s in samples)
        assert {name: len(stems) for name, stems in split.items()} == {"train": 1, "val": 1, "test": 1}
        assert split == splits.split_by_class(samples, FRACTIONS, seed)  # deterministic
        missing = splits.missing_classes(split, samples)
        assert missing["train"] == ["bottle", "bus", "car"]
        other = "2011_000003" if split["val"] == ["2011_000025"] else "2011_000025"
        assert split["test"] == [other]


def test_a_rare_class_goes_to_training_then_to_the_others(tmp_path):
    photos = {f"p{i:02d}": ["card"] for i in range(20)}
    photos["p07"] = ["card", "rare"]           # one photo: it must be in training
    photos["p11"] = photos["p15"] = ["card", "pair"]  # two: one in training, one in val
    photos["p03"] = photos["p04"] = photos["p05"] = ["card", "triple"]  # three: one in each split
    samples = folder(tmp_path, photos)
    plain_misses = 0
    for seed in range(30):
        plain = splits.split_stems([s.stem for s in samples], FRACTIONS, seed)
        plain_misses += bool(splits.missing_classes(plain, samples).get("train"))
        split = splits.split_by_class(samples, FRACTIONS, seed)
        assert {name: len(stems) for name, stems in split.items()} == {name: len(stems) for name, stems in plain.items()}
        assert "p07" in split["train"]
        missing = splits.missing_classes(split, samples)
        assert missing == {"val": ["rare"], "test": ["pair", "rare"]}, (seed, missing)
    assert plain_misses > 0  # the plain split left a class out of training for some seeds


def test_a_split_that_already_serves_every_class_is_split_stems_own(tmp_path):
    samples = folder(tmp_path, {f"img{i:03d}": ["card"] for i in range(150)})
    for seed in (0, 1234, 7):
        split = splits.split_by_class(samples, FRACTIONS, seed)
        assert split == splits.split_stems([s.stem for s in samples], FRACTIONS, seed)
        assert [len(v) for v in split.values()] == [106, 22, 22]
    assert splits.missing_classes(split, samples) == {}
    # the embedded sample (one class): notebook 01's split is unchanged by the switch
    sample = labelme.load_labelme_folder(download.SAMPLE_DIR)
    assert splits.split_by_class(sample, FRACTIONS, artifacts.SEED) == splits.split_stems(
        [s.stem for s in sample], FRACTIONS, artifacts.SEED)


def test_negatives_fill_the_splits_and_too_few_files_are_refused(tmp_path):
    samples = folder(tmp_path, {"a": ["card"], "b": ["card", "logo"], "c": [], "d": [], "e": ["logo"]})
    split = splits.split_by_class(samples, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=3)
    assert sorted(stem for stems in split.values() for stem in stems) == ["a", "b", "c", "d", "e"]
    assert "b" in split["train"]  # the one photo with both classes
    assert splits.missing_classes(split, samples).get("train") is None
    with pytest.raises(ValueError, match="too few"):
        splits.split_by_class(samples[:2], FRACTIONS, seed=0)
