"""The benchmark's re-implementation of the reference pipeline must keep producing valid samples,
or its side-by-side figures would compare against something broken."""
import torch

from maskrcnn_labelme import download
from maskrcnn_labelme.cjm_pipeline import reference_dataset


def test_reference_pipeline_gives_training_samples():
    dataset = reference_dataset(download.SAMPLE_DIR, size=128)
    assert len(dataset) == len(list(download.SAMPLE_DIR.glob("*.json")))
    torch.manual_seed(0)
    for i in range(4):
        image, target = dataset[i]
        assert image.shape == (3, 128, 128) and image.dtype == torch.float32
        assert len(target["boxes"]) == len(target["masks"]) == len(target["labels"])
