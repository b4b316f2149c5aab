"""ONNX Runtime on the CPU: sessions set up for speed, a runner that takes the PyTorch model's
place, and int8 quantization of the backbone.

`OnnxMaskRCNN` answers the calls `inference.predict`, `inference.predict_folder` and
`coco_eval.evaluate_coco` make of torchvision's Mask R-CNN in eval mode, so everything that
predicts with the PyTorch model also predicts with an exported file, and the two can be
compared with the same code (speed, COCO mask AP).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import SimpleNamespace

import torch

from .checkpoints import atomic_write

__all__ = ["OnnxMaskRCNN", "backbone_nodes", "make_session", "quantize_backbone", "session_options"]


def session_options(threads: int | None = None, *, profile: bool = False):
    """ONNX Runtime settings for one model on the CPU.

    Every graph optimisation on (constant folding, and fusing a convolution with the addition
    and activation after it into one kernel); `threads` for the work inside one operator (None:
    ONNX Runtime's default, one per physical core); operators run one after another, since Mask
    R-CNN's graph is a chain with little to run side by side. `profile` writes ONNX Runtime's
    per-operator timings to a JSON file in the temporary folder (``session.end_profiling()``
    returns its path; ``speed.onnx_parts`` reads it).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads:
        options.intra_op_num_threads = threads
    options.enable_profiling = profile
    if profile:  # into the temporary folder, not the working folder
        options.profile_file_prefix = str(Path(tempfile.gettempdir()) / "onnxruntime_profile")
    options.log_severity_level = 3  # errors only: the exported graph triggers harmless warnings
    return options


def make_session(path: os.PathLike | str, threads: int | None = None, *, profile: bool = False):
    """An ONNX Runtime session for `path` on the CPU, with ``session_options``."""
    import onnxruntime as ort

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} does not exist: export the model first (notebook 06).")
    return ort.InferenceSession(str(path), session_options(threads, profile=profile),
                                providers=["CPUExecutionProvider"])


class OnnxMaskRCNN:
    """An exported Mask R-CNN (``export.export_onnx``) behind the PyTorch model's interface.

    ``runner([image])`` takes a list of float images (3, H, W) in [0, 1], as the model does, and
    returns one dict per image with boxes, labels, scores and soft masks (N, 1, H, W) as torch
    tensors. ``transform.min_size`` / ``max_size`` tell ``inference.working_size`` the size the
    graph resizes to (the model's training size, `image_size`), so ``inference.predict`` shrinks
    a large photo first, as it does for the PyTorch model.
    """

    def __init__(self, path: os.PathLike | str, image_size: int, threads: int | None = None, *,
                 profile: bool = False):
        self.path = Path(path)
        self.session = make_session(self.path, threads, profile=profile)
        self.transform = SimpleNamespace(min_size=(image_size,), max_size=image_size, fixed_size=None)

    def eval(self) -> OnnxMaskRCNN:
        return self

    def __call__(self, images: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        results = []
        for image in images:
            boxes, labels, scores, masks = self.session.run(
                None, {"image": image.detach().float().cpu().numpy()})
            results.append({"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels),
                            "scores": torch.from_numpy(scores), "masks": torch.from_numpy(masks)})
        return results


QUANTIZED_OPS = ("Conv", "Relu", "Add", "MaxPool")


def backbone_nodes(path: os.PathLike | str) -> list[str]:
    """The names of the ResNet body's convolutions, activations, residual additions and pooling
    in an exported graph: the part int8 quantization is applied to. The exporter names each node
    after the module that made it (``/backbone/body/layer1/layer1.0/conv1/Conv``)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [node.name for node in graph.node
            if node.op_type in QUANTIZED_OPS and node.name.startswith("/backbone/body/")]


def quantize_backbone(fp32_path: os.PathLike | str, int8_path: os.PathLike | str,
                      calibration_images: Iterable[torch.Tensor]) -> Path:
    """Post-training static int8 quantization of the backbone's ResNet body.

    Static: the range of every activation is measured once, on `calibration_images` (training
    photos, float (3, H, W) in [0, 1] at the model's working size), instead of at every call.
    Weights get one scale per output channel. Only the ResNet body is quantized; the FPN, the RPN
    and the heads, where boxes and mask edges are decided, stay float32. The file keeps float
    inputs and outputs, so it drops in for the float32 one; check its accuracy before using it
    (notebook 08 compares COCO mask AP on the validation split).
    """
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quant_pre_process, quantize_static)

    images = [image.detach().float().cpu().numpy() for image in calibration_images]
    if not images:
        raise ValueError("quantize_backbone needs at least one calibration image")
    if not any(name.endswith("/Conv") for name in backbone_nodes(fp32_path)):
        raise ValueError(f"{fp32_path} has no Conv node under /backbone/body/: not an export of "
                         "this project's Mask R-CNN")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feed = iter({"image": image} for image in images)

        def get_next(self):
            return next(self.feed, None)

    def write(tmp: Path) -> None:
        with tempfile.TemporaryDirectory() as scratch:
            # constants folded into initializers first: the quantizer only quantizes a
            # convolution's bias when it is one, and ONNX Runtime only fuses a quantized
            # convolution into its int8 kernel (QLinearConv) when the bias is quantized
            prepared = Path(scratch) / "prepared.onnx"
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
            quantize_static(str(prepared), str(tmp), Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, nodes_to_quantize=backbone_nodes(prepared),
                            calibrate_method=CalibrationMethod.MinMax)

    return atomic_write(int8_path, write)
