"""Converts a CTranslate2 Whisper model (faster-whisper's format) into an openai-whisper checkpoint.

openai-whisper reads only its own checkpoints, a `torch.save`d dict of `dims` and
`model_state_dict`. CTranslate2 keeps the same weights under other names in `model.bin`, a flat
binary file (format version 6, written by `ctranslate2.specs.ModelSpec._serialize`):

    u32 version, str spec name, u32 revision, u32 n_variables,
    n_variables x (str name, u8 rank, rank x u32 dim, u8 dtype, u32 n_bytes, bytes),
    u32 n_aliases, n_aliases x (str alias, str name)

where `str` is a u16 length (with the terminating NUL) and the NUL-terminated UTF-8 bytes, all
little-endian. Quantized weights are dequantized: int8 rows are `round(w * scale)` with one
`weight_scale` per output row, int16 is one scale for the whole matrix.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from pipeline.files import atomic_file

SUPPORTED_VERSIONS = (5, 6)
WHISPER_SPEC = "WhisperSpec"
# Order of CTranslate2's DataType enum (include/ctranslate2/types.h).
CT2_DTYPES = (np.float32, np.int8, np.int16, np.int32, np.float16, "bfloat16")


class ConversionError(Exception):
    """A file that is not a CTranslate2 Whisper model this converter understands."""


@dataclass(frozen=True)
class WhisperDims:
    """The fields of `whisper.model.ModelDimensions`, read off the weights' shapes."""

    n_mels: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    n_vocab: int
    n_text_ctx: int
    n_text_state: int
    n_text_head: int
    n_text_layer: int


def read_ct2(path: Path) -> tuple[str, dict[str, np.ndarray]]:
    """The spec name and every variable of a CTranslate2 `model.bin`, aliases resolved."""
    with open(path, "rb") as f:
        version = _read(f, "I")
        if version not in SUPPORTED_VERSIONS:
            raise ConversionError(f"{path}: CTranslate2 binary version {version} is not supported")
        spec = _read_string(f)
        _read(f, "I")  # spec revision
        variables: dict[str, np.ndarray] = {}
        for _ in range(_read(f, "I")):
            name = _read_string(f)
            shape = [_read(f, "I") for _ in range(_read(f, "B"))]
            dtype_id = _read(f, "B")
            data = f.read(_read(f, "I"))
            variables[name] = _to_array(data, dtype_id, shape, name)
        for _ in range(_read(f, "I")):
            alias, target = _read_string(f), _read_string(f)
            variables[alias] = variables[target]
    return spec, variables


def _read(f: BinaryIO, fmt: str) -> int:
    size = struct.calcsize("<" + fmt)
    data = f.read(size)
    if len(data) != size:
        raise ConversionError(f"{f.name}: truncated CTranslate2 model file")
    return struct.unpack("<" + fmt, data)[0]


def _read_string(f: BinaryIO) -> str:
    data = f.read(_read(f, "H"))
    return data.rstrip(b"\0").decode("utf-8")


def _to_array(data: bytes, dtype_id: int, shape: list[int], name: str) -> np.ndarray:
    if dtype_id >= len(CT2_DTYPES):
        raise ConversionError(f"{name}: unknown CTranslate2 dtype id {dtype_id}")
    dtype = CT2_DTYPES[dtype_id]
    if dtype == "bfloat16":  # the upper half of a float32
        bits = np.frombuffer(data, np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    return np.frombuffer(data, dtype).reshape(shape)


def dequantize(variables: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Float32 weights: integer weights divided by their `<name>_scale`, floats upcast."""
    out = {}
    for name, value in variables.items():
        if name.endswith("_scale") and name[: -len("_scale")] in variables:
            continue
        scale = variables.get(name + "_scale")
        if scale is not None and value.dtype.kind == "i":
            value = value.astype(np.float32)
            scale = scale.astype(np.float32)
            value = value / scale.reshape(-1, *([1] * (value.ndim - 1))) if scale.ndim else value / scale
        out[name] = value
    return out


def convert(variables: dict[str, np.ndarray]) -> tuple[WhisperDims, dict[str, torch.Tensor]]:
    """openai-whisper's dims and state dict from CTranslate2 WhisperSpec variables."""
    v = dequantize(variables)
    state: dict[str, torch.Tensor] = {}

    def put(name: str, value: np.ndarray) -> None:
        array = np.ascontiguousarray(value)
        if array.dtype != np.float16:
            array = array.astype(np.float32)
        state[name] = torch.from_numpy(array.copy())

    def linear(dst: str, src: str) -> None:
        put(f"{dst}.weight", v[f"{src}/weight"])
        if f"{src}/bias" in v:
            put(f"{dst}.bias", v[f"{src}/bias"])

    def layer_norm(dst: str, src: str) -> None:
        put(f"{dst}.weight", v[f"{src}/gamma"])
        put(f"{dst}.bias", v[f"{src}/beta"])

    def fused(dst: str, src: str, names: tuple[str, ...]) -> None:
        """Splits a fused q/k/v projection; whisper's key has no bias (a key bias never changes
        the attention weights, so dropping it is exact)."""
        weights = np.split(v[f"{src}/weight"], len(names))
        biases = np.split(v[f"{src}/bias"], len(names))
        for name, weight, bias in zip(names, weights, biases, strict=True):
            put(f"{dst}.{name}.weight", weight)
            if name != "key":
                put(f"{dst}.{name}.bias", bias)

    def block(dst: str, src: str, cross: bool) -> None:
        fused(f"{dst}.attn", f"{src}/self_attention/linear_0", ("query", "key", "value"))
        linear(f"{dst}.attn.out", f"{src}/self_attention/linear_1")
        layer_norm(f"{dst}.attn_ln", f"{src}/self_attention/layer_norm")
        if cross:
            linear(f"{dst}.cross_attn.query", f"{src}/attention/linear_0")
            fused(f"{dst}.cross_attn", f"{src}/attention/linear_1", ("key", "value"))
            linear(f"{dst}.cross_attn.out", f"{src}/attention/linear_2")
            layer_norm(f"{dst}.cross_attn_ln", f"{src}/attention/layer_norm")
        linear(f"{dst}.mlp.0", f"{src}/ffn/linear_0")
        linear(f"{dst}.mlp.2", f"{src}/ffn/linear_1")
        layer_norm(f"{dst}.mlp_ln", f"{src}/ffn/layer_norm")

    n_audio_layer = _count_layers(v, "encoder")
    n_text_layer = _count_layers(v, "decoder")
    linear("encoder.conv1", "encoder/conv1")
    linear("encoder.conv2", "encoder/conv2")
    put("encoder.positional_embedding", v["encoder/position_encodings/encodings"])
    for i in range(n_audio_layer):
        block(f"encoder.blocks.{i}", f"encoder/layer_{i}", cross=False)
    layer_norm("encoder.ln_post", "encoder/layer_norm")
    put("decoder.token_embedding.weight", v["decoder/embeddings/weight"])
    put("decoder.positional_embedding", v["decoder/position_encodings/encodings"])
    for i in range(n_text_layer):
        block(f"decoder.blocks.{i}", f"decoder/layer_{i}", cross=True)
    layer_norm("decoder.ln", "decoder/layer_norm")

    n_audio_ctx, n_audio_state = v["encoder/position_encodings/encodings"].shape
    n_text_ctx, n_text_state = v["decoder/position_encodings/encodings"].shape
    dims = WhisperDims(
        n_mels=int(v["encoder/conv1/weight"].shape[1]),
        n_audio_ctx=int(n_audio_ctx),
        n_audio_state=int(n_audio_state),
        n_audio_head=int(v["encoder/num_heads"]),
        n_audio_layer=n_audio_layer,
        n_vocab=int(v["decoder/embeddings/weight"].shape[0]),
        n_text_ctx=int(n_text_ctx),
        n_text_state=int(n_text_state),
        n_text_head=int(v["decoder/num_heads"]),
        n_text_layer=n_text_layer,
    )
    return dims, state


def _count_layers(variables: dict[str, np.ndarray], side: str) -> int:
    n = 0
    while f"{side}/layer_{n}/ffn/linear_0/weight" in variables:
        n += 1
    return n


def convert_ct2_dir(model_dir: Path, out: Path) -> Path:
    """Writes `out` (an openai-whisper checkpoint) from a CTranslate2 Whisper model folder.

    The alignment heads (which cross-attention heads track time, used for word timestamps) are
    taken from the folder's config.json and stored under `alignment_heads`, a key
    `whisper.load_model` ignores and `pipeline.asr` applies. Written to a temporary name first.
    """
    model_bin = Path(model_dir) / "model.bin"
    if not model_bin.is_file():
        raise ConversionError(f"{model_dir}: no model.bin (not a CTranslate2 model folder)")
    spec, variables = read_ct2(model_bin)
    if spec != WHISPER_SPEC:
        raise ConversionError(f"{model_bin}: a {spec}, not a {WHISPER_SPEC}")
    dims, state = convert(variables)
    checkpoint: dict = {"dims": asdict(dims), "model_state_dict": state}
    config = Path(model_dir) / "config.json"
    if config.is_file():
        heads = json.loads(config.read_text()).get("alignment_heads")
        if heads:
            checkpoint["alignment_heads"] = [[int(layer), int(head)] for layer, head in heads]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp:
        torch.save(checkpoint, tmp)
    return out
