"""The model registry: which family runs a model folder (docs/architecture.md, 'Model families').

A folder names its architecture in config.json's `architectures` (transformers' convention) or,
for a diffusers pipeline folder, in model_index.json's `_class_name`. A family's module is imported
when it is first asked for (a folder of it, or the command line's list of family tools). Adding a
family: its folder under models/ and one line in FAMILIES.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from functools import lru_cache

from ..config import ConfigError, read_json_object
from .base import ModelFamily, ModelInfo


@dataclass(frozen=True)
class FamilyEntry:
    name: str
    family: str  # "module:Class" of its ModelFamily
    architectures: tuple[str, ...] = ()  # config.json "architectures"
    diffusers_pipelines: tuple[str, ...] = ()  # model_index.json "_class_name"


FAMILIES = (
    FamilyEntry("hunyuan_image3", "epdiff.models.hunyuan_image3.family:HunyuanImage3Family",
                architectures=("HunyuanImage3ForCausalMM",)),
    FamilyEntry("nucleus_image", "epdiff.models.nucleus_image.family:NucleusImageFamily",
                diffusers_pipelines=("NucleusMoEImagePipeline",)),
)


def family_names() -> list[str]:
    return [entry.name for entry in FAMILIES]


@lru_cache(maxsize=None)
def get_family(name: str) -> ModelFamily:
    for entry in FAMILIES:
        if entry.name == name:
            module, _, cls = entry.family.partition(":")
            return getattr(importlib.import_module(module), cls)()
    raise ConfigError(f"unknown model family {name!r}; the families are {', '.join(family_names())}")


def _known() -> str:
    names = [f"{e.name} ({', '.join(e.architectures + e.diffusers_pipelines)})" for e in FAMILIES]
    return "; ".join(names)


def family_for_folder(model_dir: str) -> ModelFamily:
    """The family of a model folder; ConfigError names the field and the families that exist."""
    index = os.path.join(model_dir, "model_index.json")
    config = os.path.join(model_dir, "config.json")
    if os.path.isfile(index):
        name = read_json_object(index).get("_class_name")
        for entry in FAMILIES:
            if name in entry.diffusers_pipelines:
                return get_family(entry.name)
        raise ConfigError(f"{index}: _class_name {name!r} is not a model epdiff runs; it runs {_known()}")
    if not os.path.isfile(config):
        raise ConfigError(f"{model_dir}: no config.json or model_index.json: not a model folder")
    architectures = read_json_object(config).get("architectures")
    for entry in FAMILIES:
        if isinstance(architectures, list) and set(architectures) & set(entry.architectures):
            return get_family(entry.name)
    raise ConfigError(f"{config}: architectures {architectures!r} is not a model epdiff runs; it runs {_known()}")


@lru_cache(maxsize=8)
def model_info(model_dir: str) -> ModelInfo:
    """The folder read by its family, once per process (model_dir: an absolute path)."""
    return family_for_folder(model_dir).read(model_dir)
