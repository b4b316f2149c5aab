"""The COCO weights are read only when they are torchvision's published file, and never unpickled
with code: a file planted in the torch hub cache must not run anything."""

from __future__ import annotations

import hashlib
import os
import pickle

import pytest
import torch

from maskrcnn_labelme import models


class Payload:
    """Unpickling this creates a folder: the stand-in for code a hostile file would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *a, **k: pytest.fail("must not download: the file is cached"))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    return tmp_path


def publish_as(monkeypatch, path):
    """Pretend torchvision published `path`: the URL's hash prefix becomes the file's."""
    prefix = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    url = f"https://download.example/models/maskrcnn_test-{prefix}.pth"
    monkeypatch.setattr(models, "COCO_WEIGHTS_URL", url)
    published = models.coco_weights_file()
    path.rename(published)
    return published


def test_a_planted_weights_file_is_refused_unread(hub):
    marker = hub / "code-ran"
    models.coco_weights_file().write_bytes(pickle.dumps({"model": Payload(marker)}))
    with pytest.raises(models.WeightsError, match="not torchvision's published COCO weights"):
        models.build_model(2, image_size=64, pretrained=True)
    assert not marker.exists()


def test_even_a_file_with_the_published_hash_cannot_run_code(hub, monkeypatch):
    marker = hub / "code-ran"
    crafted = hub / "crafted.pth"
    crafted.write_bytes(pickle.dumps({"model": Payload(marker)}))
    publish_as(monkeypatch, crafted)
    with pytest.raises(models.WeightsError, match="cannot be read safely"):
        models.build_model(2, image_size=64, pretrained=True)
    assert not marker.exists()


def test_genuine_weights_load_and_freeze_what_torchvision_freezes(hub, monkeypatch):
    torch.manual_seed(0)
    donor = models.load_maskrcnn(image_size=64, pretrained=False)
    torch.save(donor.state_dict(), hub / "weights.pth")
    publish_as(monkeypatch, hub / "weights.pth")

    ours = models.load_maskrcnn(image_size=64, pretrained=True)
    for name, value in donor.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value), name

    # torchvision's own pretrained build, fed the same state dict without touching a network
    import torchvision.models._api as weights_api
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_V2_Weights, maskrcnn_resnet50_fpn_v2

    monkeypatch.setattr(weights_api, "load_state_dict_from_url", lambda *a, **k: donor.state_dict())
    reference = maskrcnn_resnet50_fpn_v2(weights=MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1,
                                         min_size=64, max_size=64)
    trainable = {n: p.requires_grad for n, p in ours.named_parameters()}
    assert trainable == {n: p.requires_grad for n, p in reference.named_parameters()}
    assert not trainable["backbone.body.layer1.0.conv1.weight"] and trainable["backbone.body.layer2.0.conv1.weight"]


def test_a_download_is_checked_against_the_published_hash(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, hash_prefix))
        raise RuntimeError(f'invalid hash value (expected "{hash_prefix}", got "deadbeef")')

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    model = models.load_maskrcnn(image_size=64, pretrained=True, download=True)
    assert calls == [(models.COCO_WEIGHTS_URL, models.COCO_WEIGHTS_URL.rsplit("-", 1)[1].split(".")[0])]
    assert model is not None and not models.coco_weights_file().exists()
