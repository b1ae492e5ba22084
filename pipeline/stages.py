"""The one interface every extraction stage implements, and the registry of stages by name.

A stage knows nothing of HDF5, Dask or progress bars: it is given one decoded `Media` and
yields blocks of rows on that file's frame grid. The runner writes them and owns the rest.

A stage's life: built from plain options (checked, nothing read), `resolve()` once before any job
(the only step that reads model files, hashes weights, converts a model or checks the device),
then `config()` (plain data from what `resolve` found), `load()` once per process, `run()` per file.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, ClassVar, TypeVar

import numpy as np

from pipeline.media import Media

STAGES = {
    "faces": "pipeline.faces:FacesStage",
    "audio": "pipeline.audio:AudioStage",
    "text": "pipeline.text:TextStage",
}
ALL = "all"
# Settings chosen per video rather than per feature set (which face of a two-person video is the
# subject): each shard records them in its config, but the config hash, of which a store holds one
# per stage, leaves them out, so videos with different subjects share a store.
PER_VIDEO = {"faces": ("subject",)}


@dataclass
class Rows:
    """Consecutive rows `start, start+1, ...` of per-frame arrays; every array has the same length."""

    start: int
    arrays: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))


@dataclass
class Extra:
    """Arrays that are not on the frame grid (a transcript's words) and attrs, yielded once at the end."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)


class Stage(ABC):
    name: ClassVar[str]
    resolved = False

    def resolve(self) -> None:
        """Finds the stage's models and device and hashes the weights a config records; raises
        ModelUnavailable or ValueError (one line naming the option) for what cannot be used here.
        Subclasses set their findings, then call this."""
        self.resolved = True

    def check_resolved(self) -> None:
        if not self.resolved:
            raise RuntimeError(f"{self.name} stage: resolve() it before asking its config")

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> Stage:
        """Builds the stage from the extract command's options, taking the ones it accepts."""
        accepted = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in options.items() if k in accepted})

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """Every setting that changes the output, as plain data (no I/O: what `resolve` found);
        its hash decides what is done."""

    def load(self) -> None:
        """Loads models (resolving the stage first if that was not done). Called once per process
        before the first `run`."""

    def provenance(self) -> dict[str, Any]:
        """Model names, weights checksums and library versions, recorded with each shard."""
        return {}

    @abstractmethod
    def run(self, media: Media) -> Iterator[Rows | Extra]:
        """Yields every frame's rows, in order, covering the whole grid; then optionally one Extra."""


S = TypeVar("S", bound=Stage)


def resolved(stage: S) -> S:
    """`stage`, resolved: for building one outside the runner (predict, tests)."""
    stage.resolve()
    return stage


def config_hash(stage: Stage) -> str:
    return hash_config(stage.name, stage.config())


def hash_config(name: str, config: dict[str, Any]) -> str:
    """The hash a store compares: of the config without its per-video settings."""
    text = json.dumps({"stage": name, **shared_config(name, config)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def shared_config(name: str, config: dict[str, Any]) -> dict[str, Any]:
    """A stage's config without its per-video settings (PER_VIDEO): what all its shards in a store share."""
    return {k: v for k, v in config.items() if k not in PER_VIDEO.get(name, ())}


def video_settings(name: str, config: dict[str, Any]) -> dict[str, Any]:
    """A stage's per-video settings in `config` (PER_VIDEO); a default is left out of a config."""
    return {k: v for k, v in config.items() if k in PER_VIDEO.get(name, ())}


def build_stage(name: str, options: dict[str, Any]) -> Stage:
    """A stage by name, built from plain options (so a Dask worker can build the same one)."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; choose from {', '.join([*STAGES, ALL])}")
    module, cls = STAGES[name].split(":")
    return getattr(importlib.import_module(module), cls).from_options(options)


def expand(names: list[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        for one in STAGES if name == ALL else [name]:
            if one not in STAGES:
                raise ValueError(f"unknown stage {one!r}; choose from {', '.join([*STAGES, ALL])}")
            if one not in out:
                out.append(one)
    return out


def library_versions(*packages: str) -> dict[str, str]:
    out = {}
    for package in packages:
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out
