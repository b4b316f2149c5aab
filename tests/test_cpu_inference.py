"""Faster CPU inference (notebook 08, benchmarks/run.py): fewer proposals, the ONNX Runtime
runner, int8 quantization of the backbone, the time per stage, and decoding ahead."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from maskrcnn_labelme import coco_eval, export, inference, labelme, models, onnx_runner, speed

CLASSES = ["background", "card"]
SIZE = 128


def random_model(seed=3):
    """This project's model at 128 px with random weights, letting its detections through, with
    a stricter NMS (fewer near-duplicates) and constant masks (each its box's rectangle)."""
    torch.manual_seed(seed)
    model = models.build_model(len(CLASSES), image_size=SIZE, pretrained=False).eval()
    model.roi_heads.score_thresh, model.roi_heads.nms_thresh = 0.0, 0.3
    with torch.no_grad():
        model.roi_heads.mask_predictor.mask_fcn_logits.weight.zero_()
        model.roi_heads.mask_predictor.mask_fcn_logits.bias.fill_(4.0)
    return model


def photo(width=160, height=120, seed=0):
    image = Image.new("RGB", (width, height), (90, 110, 130))
    draw = ImageDraw.Draw(image)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(4):
        x0, y0 = (torch.rand(2, generator=generator) * torch.tensor([width * 0.6, height * 0.6])).tolist()
        color = tuple(int(c) for c in torch.randint(0, 255, (3,), generator=generator))
        draw.rounded_rectangle([x0, y0, x0 + width * 0.3, y0 + height * 0.3], radius=6, fill=color)
    return image.filter(ImageFilter.GaussianBlur(2))


def as_tensor(image):
    from maskrcnn_labelme import pixels

    return pixels.to_float_image(image)


def test_set_proposals_limits_what_the_box_head_sees_at_inference_only():
    model = random_model()
    seen = []
    model.roi_heads.box_head.register_forward_hook(lambda module, args, out: seen.append(out.shape[0]))
    image = as_tensor(photo(SIZE, SIZE))
    with torch.no_grad():
        model([image])
        inference.set_proposals(model, 7)
        model([image])
    assert seen[0] > 7 and seen[1] == 7
    assert inference.proposals(model) == 7
    assert model.rpn._post_nms_top_n["training"] == 2000  # torchvision's default, untouched
    with pytest.raises(ValueError, match="at least 1"):
        inference.set_proposals(model, 0)


def test_choose_proposals_takes_the_fewest_within_the_tolerance(monkeypatch):
    model = random_model()
    inference.set_proposals(model, 123)
    ap = {1000: 0.800, 500: 0.801, 300: 0.795, 100: 0.785, 50: 0.700}
    asked = []

    def fake_evaluate(model, loader, device, class_names, **kwargs):
        asked.append(inference.proposals(model))
        return {"segm_AP": ap[inference.proposals(model)]}

    monkeypatch.setattr(coco_eval, "evaluate_coco", fake_evaluate)
    chosen, measured = inference.choose_proposals(model, [], CLASSES, candidates=(50, 100, 300, 500, 1000),
                                                  progress=False)
    # 100 loses 0.015 against the most proposals: more than 0.01; 300 loses 0.005
    assert chosen == 300 and measured == ap and asked == [1000, 500, 300, 100, 50]
    assert inference.proposals(model) == 123  # restored
    assert inference.choose_proposals(model, [], CLASSES, candidates=(50, 100, 300, 500, 1000),
                                      tolerance=0.02, progress=False)[0] == 100


def test_eager_parts_times_every_stage_and_returns_the_models_own_detections():
    model = random_model()
    image = as_tensor(photo())
    with torch.no_grad():
        (expected,) = model([image])
    (detections,), seconds = speed.eager_parts(model, [image])
    assert list(seconds) == list(speed.PARTS) and all(s > 0 for s in seconds.values())
    assert len(detections["boxes"]) == len(expected["boxes"]) > 0
    for key in ("boxes", "scores", "masks"):
        assert torch.equal(detections[key], expected[key])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random model with 50 proposals, exported to ONNX."""
    folder = tmp_path_factory.mktemp("onnx")
    model = inference.set_proposals(random_model(), 50)
    path = export.export_onnx(model, folder / "model.onnx", as_tensor(photo(100, 80, seed=9)))
    return model, path


def test_the_onnx_runner_predicts_what_the_model_predicts(exported):
    model, path = exported
    runner = onnx_runner.OnnxMaskRCNN(path, SIZE)
    image = photo(320, 240, seed=1)  # twice the working size: predict shrinks it first
    eager = inference.predict(model, image, score_threshold=0.0)
    onnx = inference.predict(runner, image, score_threshold=0.0)
    assert onnx["masks"].shape[1:] == (240, 320) and len(eager["scores"]) > 0
    # the five best detections come out of both runtimes, in place
    top = eager["scores"].argsort(descending=True)[:5]
    match = export.match_detections({k: v[top] for k, v in eager.items() if k != "masks"} |
                                    {"masks": eager["masks"][top, None].float()},
                                    {**{k: v for k, v in onnx.items() if k != "masks"},
                                     "masks": onnx["masks"][:, None].float()})
    assert match["box_iou"].min() > 0.99 and match["mask_iou"].min() > 0.98


def test_predict_folder_runs_the_onnx_runner(exported, tmp_path):
    _, path = exported
    runner = onnx_runner.OnnxMaskRCNN(path, SIZE)
    for seed in range(2):
        photo(seed=seed).save(tmp_path / f"p{seed}.jpg")
    rows = inference.predict_folder(runner, sorted(tmp_path.glob("*.jpg")), tmp_path / "out", CLASSES,
                                    progress=False, score_threshold=0.3)
    expected = [len(inference.predict(runner, Image.open(p).convert("RGB"), score_threshold=0.3)["scores"])
                for p in sorted(tmp_path.glob("*.jpg"))]
    assert [row["detections"] for row in rows] == expected and {row["json"] for row in rows} == {"written"}
    assert len(labelme.load_labelme_folder(tmp_path / "out")) == 2


def test_onnx_parts_add_up_to_the_run(exported):
    _, path = exported
    runner = onnx_runner.OnnxMaskRCNN(path, SIZE, profile=True)
    image = as_tensor(photo())
    for _ in range(2):
        runner([image])
    profile = Path(runner.session.end_profiling())
    try:
        events = json.loads(profile.read_text())
        parts = speed.onnx_parts(profile)
    finally:
        profile.unlink()
    runs = [e["dur"] / 1e6 for e in events if e.get("name") == "model_run"]
    assert len(runs) == 2 and list(parts) == list(speed.PARTS)
    assert all(parts[p] > 0 for p in ("backbone + FPN", "RPN", "RoI heads", "mask paste"))
    # operator time fits in the run's time (what is left is the executor's own work)
    assert 0.6 * sum(runs) / 2 < sum(parts.values()) <= sum(runs) / 2


def test_quantize_backbone_quantizes_the_resnet_body_and_nothing_else(exported, tmp_path):
    import onnx
    import onnxruntime

    model, path = exported
    calibration = [as_tensor(photo(SIZE, 96, seed=s)) for s in range(2)]
    int8 = onnx_runner.quantize_backbone(path, tmp_path / "int8.onnx", calibration)
    graph = onnx.load(str(int8)).graph
    dequantized = {out for node in graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    convolutions = [node for node in graph.node if node.op_type == "Conv"]
    quantized = {node.name for node in convolutions if node.input[1] in dequantized}
    body = {node.name for node in convolutions if node.name.startswith("/backbone/body/")}
    assert quantized == body and len(body) == 53  # ResNet-50: 53 convolutions
    # ONNX Runtime runs each of them with its int8 kernel
    options = onnx_runner.session_options()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    onnxruntime.InferenceSession(str(int8), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx")).graph.node
    assert sum(node.op_type == "QLinearConv" for node in optimized) == 53
    # float in, float out: a drop-in for the float32 file
    (out,) = onnx_runner.OnnxMaskRCNN(int8, SIZE)([as_tensor(photo())])
    assert out["masks"].dtype == torch.float32 and out["masks"].shape[1:] == (1, 120, 160)


def test_the_runner_and_the_quantizer_name_the_file_they_cannot_use(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        onnx_runner.OnnxMaskRCNN(tmp_path / "missing.onnx", SIZE)
    conv = tmp_path / "conv.onnx"
    torch.onnx.export(torch.nn.Conv2d(3, 4, 3), (torch.zeros(1, 3, 8, 8),), str(conv), dynamo=False,
                      input_names=["image"])
    with pytest.raises(ValueError, match="conv.onnx has no Conv node under /backbone/body/"):
        onnx_runner.quantize_backbone(conv, tmp_path / "int8.onnx", [torch.zeros(1, 3, 8, 8)])
    with pytest.raises(ValueError, match="at least one calibration image"):
        onnx_runner.quantize_backbone(conv, tmp_path / "int8.onnx", [])
    assert not (tmp_path / "int8.onnx").exists()


class WaitsForTheNextDecode(torch.nn.Module):
    """A stand-in model that, on the first photo, waits until the second photo's decoding has
    begun: it returns at once when decoding overlaps prediction, and records a timeout when it
    does not."""

    def __init__(self, second_started: threading.Event):
        super().__init__()
        self.second_started = second_started
        self.calls = 0
        self.overlapped = []

    def forward(self, images):
        self.calls += 1
        if self.calls == 1:
            self.overlapped.append(self.second_started.wait(timeout=10))
        return [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                 "scores": torch.zeros(0), "masks": torch.zeros(0, 1, *image.shape[-2:])} for image in images]


def test_predict_folder_decodes_the_next_photo_while_predicting(tmp_path, monkeypatch):
    paths = []
    for seed in range(3):
        photo(seed=seed).save(tmp_path / f"p{seed}.jpg")
        paths.append(tmp_path / f"p{seed}.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"not a photo")
    paths.insert(1, tmp_path / "broken.jpg")
    second_started = threading.Event()
    read = inference._read_photo

    def reading(path):
        if path == paths[1]:
            second_started.set()
        return read(path)

    monkeypatch.setattr(inference, "_read_photo", reading)
    model = WaitsForTheNextDecode(second_started)
    rows = inference.predict_folder(model, paths, tmp_path / "out", CLASSES, progress=False)
    assert model.overlapped == [True]
    # in order, and the unreadable file reported in its place
    assert [row["image"] for row in rows] == [p.name for p in paths]
    assert rows[1]["json"].startswith("error: cannot read") and rows[1]["detections"] is None
    assert [rows[i]["detections"] for i in (0, 2, 3)] == [0, 0, 0] and model.calls == 3
