"""What every part of rcma reports errors with: one line of text for an error, the run error of a
model (or device) this machine cannot provide, and the one check of a `--device` option."""

from __future__ import annotations

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")


class ModelUnavailable(Exception):
    """A model, its weights or the device to run it on that this machine cannot provide; the
    message says how to provide it."""


def one_line(error: BaseException, with_type: bool = False) -> str:
    """The error's message on one line (white space folded), or its type's name when it has none;
    `with_type` puts the type's name first (for errors no check of rcma's raised: a library's)."""
    text = " ".join((str(error) or type(error).__name__).split())
    return f"{type(error).__name__}: {text}" if with_type and str(error) else text


def check_device(device: str) -> str:
    """`device` when it names a torch device rcma runs on (see DEVICES), else ModelUnavailable."""
    kind, colon, index = device.partition(":")
    if device in ("auto", "cpu", "mps") or (kind == "cuda" and (not colon or index.isdigit())):
        return device
    raise ModelUnavailable(f"--device {device}: choose from {', '.join(DEVICES)}")


def resolve_device(device: str) -> str:
    """The torch device `device` names: "auto" is CUDA when torch sees a GPU, else the CPU."""
    import torch

    check_device(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelUnavailable(
            f"--device {device}: torch sees no CUDA device here (use --device cpu or auto)"
        )
    return device
