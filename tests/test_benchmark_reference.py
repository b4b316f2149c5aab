"""The benchmark's re-implementation of the reference pipeline must keep producing valid samples,
or its side-by-side figures would compare against something broken."""
import pytest
import torch

from maskrcnn_labelme import download
from maskrcnn_labelme.cjm_pipeline import reference_dataset
from maskrcnn_labelme.settings import TrainSettings


def test_reference_pipeline_gives_training_samples():
    dataset = reference_dataset(download.SAMPLE_DIR, size=128)
    assert len(dataset) == len(list(download.SAMPLE_DIR.glob("*.json")))
    torch.manual_seed(0)
    for i in range(4):
        image, target = dataset[i]
        assert image.shape == (3, 128, 128) and image.dtype == torch.float32
        assert len(target["boxes"]) == len(target["masks"]) == len(target["labels"])


def test_rows_a_longer_benchmark_adds_are_replaced_by_its_next_run_and_kept_by_run_py(tmp_path):
    """benchmarks/train_cpu.py and train_cpu_ap.py store their rows in results.json
    (add_to_results); their next run replaces them, and run.py's rewrite keeps them."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import run as benchmark

    output = tmp_path / "results.json"
    benchmark.add_to_results("cpu_training", {"steps": 5}, [("step, images/s", 0.1, 0.2, 2.0, "first")], output=output)
    benchmark.add_to_results("cpu_training", {"steps": 6}, [("step, images/s", 0.1, 0.3, 3.0, "again")], output=output)
    benchmark.add_to_results("ap", {"seeds": 2}, [("mask AP", 0.05, 0.08, 1.6, "")], output=output)
    stored = json.loads(output.read_text())
    assert stored["cpu_training"] == {"steps": 6}
    assert [(row["from"], row["note"]) for row in stored["rows"]] == [("cpu_training", "again"), ("ap", "")]

    rewritten = {"rows": [{"measure": "pipeline", "reference": 1.0, "ours": 5.0, "ratio": 5.0, "note": ""}]}
    added = benchmark.keep_added_rows(rewritten, output)
    assert [row["from"] for row in added] == ["cpu_training", "ap"]
    assert [row["measure"] for row in rewritten["rows"]] == ["pipeline", "step, images/s", "mask AP"]
    assert rewritten["cpu_training"] == {"steps": 6} and rewritten["ap"] == {"seeds": 2}


def test_the_benchmarks_name_the_variant_notebook_04_s_cpu_profile_trains_with():
    """The rows "previous settings vs now" compare torchvision's numbers with the measured variant
    that has every CPU-profile setting, image size included (a variant that only shares the
    region numbers is not "now")."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import train_cpu
    import train_cpu_ap

    today = TrainSettings().resolve("cpu", smoke=False)
    wanted = {"box_regions": today.box_regions, "train_proposals": today.train_proposals,
              "image_size": today.image_size}
    results = {"bf16_native": False, "size": 512, "variants": {name: {} for name in train_cpu.VARIANTS}}
    settings, bf16, channels_last = train_cpu.VARIANTS[train_cpu.now_variant(results)]
    assert {"image_size": 512, **settings} == wanted and not bf16 and not channels_last
    assert {"image_size": 512, **train_cpu_ap.VARIANTS[train_cpu_ap.now_variant()]} == wanted
    first = next(iter(train_cpu.VARIANTS))
    with pytest.raises(LookupError):  # today's variant not measured: no row, rather than a wrong one
        train_cpu.now_variant({**results, "variants": {first: {}}})
