"""Build the frozen vision tower and its image transform from `model.vision`, for each source.

- `source: open_clip` (default): an open_clip model by `name` (+ `pretrained` tag), `custom_config` or
  `config_path`; its `.visual` is the tower (open_clip's ViTs and its timm towers) and open_clip's eval transform
  the image transform.
- `source: hf`: a transformers vision model by `name` (hub id or local dir, + `revision`, `torch_dtype`) or
  inline `config` (random init). A dual-tower checkpoint (SigLIP, CLIP) loads only its vision half. The image
  transform is the model's own image processor settings (resize, crop, mean, std) as torchvision steps.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

# A minimal text tower, filled in for custom vision configs that only describe the tower (open_clip builds both).
_PLACEHOLDER_TEXT_CFG = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}
TorchDtypeName = Literal["float32", "bfloat16", "float16", "auto"]


@dataclass
class VisionConfig:
    """The vision tower (see the module docstring): `source`, then `name` or an inline config of that source.

    `ln_post_on_tokens` (open_clip ViTs): keep the final LayerNorm on the patch tokens (the released models did not).
    """

    source: Literal["open_clip", "hf"] = "open_clip"
    name: str | None = None
    pretrained: str | None = None  # open_clip: weights tag of `name` (null = random init)
    custom_config: dict | None = None  # open_clip: an inline model config
    config_path: str | None = None  # open_clip: a model-config JSON file
    config: dict | None = None  # hf: an inline transformers config with `model_type` (random init)
    revision: str | None = None  # hf: the hub revision of `name`
    torch_dtype: TorchDtypeName | None = None  # hf: dtype to load `name` in
    ln_post_on_tokens: bool = False

    def __post_init__(self):
        given = {k for k in ("name", "custom_config", "config_path", "config") if getattr(self, k) is not None}
        allowed = {"open_clip": {"name", "custom_config", "config_path"}, "hf": {"name", "config"}}[self.source]
        foreign = sorted(given - allowed)
        if foreign:
            raise ValueError(f"{foreign[0]}: does not apply to source {self.source!r} (it takes {sorted(allowed)})")
        if len(given) != 1:
            got = sorted(given) or "none"
            raise ValueError(f"source: {self.source!r} needs exactly one of {sorted(allowed)}, got {got}")
        if self.pretrained is not None and (self.source != "open_clip" or self.name is None):
            raise ValueError("pretrained: only applies with source open_clip and a name (custom configs are random)")
        for key in ("revision", "torch_dtype"):
            if getattr(self, key) is not None and (self.source != "hf" or self.name is None):
                raise ValueError(f"{key}: only applies with source hf and a name")


def build_vision(vision: VisionConfig, on_meta: bool = False) -> tuple[nn.Module, Callable]:
    """The tower module and its eval image transform. `on_meta`: shapes only, no weights read."""
    if vision.source == "hf":
        return _build_transformers_vision(vision, on_meta)
    return _build_open_clip_vision(vision, on_meta)


# -------------------------------------------------------------------------------------------------- open_clip


@contextlib.contextmanager
def _registered_open_clip_config(vision: VisionConfig) -> Iterator[str]:
    """Yield the open_clip model name for `vision`, registering a custom config with open_clip if needed."""
    import open_clip

    if vision.name is not None:
        yield vision.name
        return
    if vision.config_path is not None:
        path = Path(vision.config_path)
        if not path.is_file():
            raise FileNotFoundError(f"vision.config_path {path} does not exist")
        model_cfg = json.loads(path.read_text())
        _check_open_clip_config(model_cfg, f"vision.config_path {path}")
        open_clip.add_model_config(path)
        yield path.stem
        return
    model_cfg = dict(vision.custom_config)
    _check_open_clip_config(model_cfg, "vision.custom_config")
    model_cfg.setdefault("embed_dim", 32)
    model_cfg.setdefault("text_cfg", dict(_PLACEHOLDER_TEXT_CFG))
    digest = hashlib.sha1(json.dumps(model_cfg, sort_keys=True).encode()).hexdigest()[:12]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"flamingo-custom-vision-{digest}.json"
        path.write_text(json.dumps(model_cfg))
        open_clip.add_model_config(path)
        yield path.stem


def _check_open_clip_config(model_cfg: Any, where: str) -> None:
    if not isinstance(model_cfg, Mapping) or not isinstance(model_cfg.get("vision_cfg"), Mapping):
        raise ValueError(f"{where} must be an open_clip model config with a 'vision_cfg' mapping")


def open_clip_tag_settings(vision: VisionConfig) -> dict[str, Any]:
    """What the `pretrained` tag's registry entry sets beyond the weights (no download), as keywords of
    `open_clip.create_model_and_transforms`: QuickGELU for the OpenAI weights, and the tag's preprocessing.

    open_clip 3.3 only warns when a tag was trained with QuickGELU (`openai`) and the model config says GELU; the
    OpenAI CLIP towers, the released OpenFlamingo models' among them (open_clip 2.x built them with QuickGELU), need
    it. The preprocessing keywords make a meta-device build (no weights read) get the same transform as rank 0's.
    """
    from open_clip.pretrained import get_pretrained_cfg

    if vision.name is None or vision.pretrained is None:
        return {}
    tag = get_pretrained_cfg(vision.name, vision.pretrained)
    settings: dict[str, Any] = {"force_quick_gelu": True} if tag.get("quick_gelu") else {}
    for key in ("mean", "std", "interpolation", "resize_mode"):
        if tag.get(key) is not None:
            settings[f"image_{key}"] = tag[key]
    return settings


def _build_open_clip_vision(vision: VisionConfig, on_meta: bool) -> tuple[nn.Module, Callable]:
    """open_clip `.visual` (the text tower is dropped) and open_clip's eval image transform."""
    import open_clip

    import flamingo_composer.models.tiny_timm  # noqa: F401  (registers the tiny timm trunks by name)

    settings = open_clip_tag_settings(vision)
    with _registered_open_clip_config(vision) as model_name:
        if on_meta:
            clip, _, eval_transform = open_clip.create_model_and_transforms(
                model_name, pretrained=None, device="meta", **settings
            )
        else:
            clip, _, eval_transform = open_clip.create_model_and_transforms(
                model_name, pretrained=vision.pretrained, **settings
            )
    return clip.visual, eval_transform


# ---------------------------------------------------------------------------------------------- transformers


def _vision_model_class(config):
    """The transformers vision-only class for `config` or for its `vision_config` (a dual-tower model's)."""
    from transformers import MODEL_MAPPING

    vision_config = getattr(config, "vision_config", None) or config
    try:
        return MODEL_MAPPING[type(vision_config)], vision_config
    except KeyError:
        raise ValueError(
            f"vision: transformers has no vision model class for config {type(vision_config).__name__}"
        ) from None


def _build_transformers_vision(vision: VisionConfig, on_meta: bool) -> tuple[nn.Module, Callable]:
    from transformers import AutoConfig

    if vision.config is not None:
        config = dict(vision.config)
        model_type = config.pop("model_type", None)
        if model_type is None:
            raise ValueError("vision.config must contain 'model_type' (e.g. siglip_vision_model, clip_vision_model)")
        model_class, vision_config = _vision_model_class(AutoConfig.for_model(model_type, **config))
        model = model_class._from_config(vision_config)
    else:
        config = AutoConfig.from_pretrained(vision.name, revision=vision.revision)
        model_class, vision_config = _vision_model_class(config)
        if on_meta:
            model = model_class._from_config(vision_config)
        else:
            dtype = vision.torch_dtype if vision.torch_dtype in (None, "auto") else getattr(torch, vision.torch_dtype)
            model = model_class.from_pretrained(vision.name, revision=vision.revision, torch_dtype=dtype)
    return model, image_processor_transform(vision_config, vision.name, vision.revision)


def _default_image_processor(vision_config):
    """The image processor class of the model type, with its defaults at the config's image size."""
    import transformers
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    model_type = vision_config.model_type.removesuffix("_vision_model")
    names = IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type)
    if not names or names[0] is None:
        raise ValueError(f"vision: no image processor is known for model_type {vision_config.model_type!r}")
    processor = getattr(transformers, names[0])()
    side = vision_config.image_size
    if "shortest_edge" in processor.size:
        processor.size = {"shortest_edge": side}
    else:
        processor.size = {"height": side, "width": side}
    if getattr(processor, "crop_size", None):
        processor.crop_size = {"height": side, "width": side}
    return processor


def image_processor_transform(vision_config, name: str | None = None, revision: str | None = None):
    """A transformers image processor's eval steps as a torchvision Compose (PIL steps, ToTensor, Normalize)."""
    from torchvision import transforms as T

    if name is not None:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(name, revision=revision)
    else:
        processor = _default_image_processor(vision_config)
    if getattr(processor, "do_rescale", True) and abs(processor.rescale_factor - 1 / 255) > 1e-12:
        raise ValueError(f"vision: image processor rescales by {processor.rescale_factor}, not 1/255")
    interpolation = T.InterpolationMode(
        {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}[int(processor.resample)]
    )
    steps = []
    if processor.do_resize:
        size = processor.size
        side = size["shortest_edge"] if "shortest_edge" in size else (size["height"], size["width"])
        steps.append(T.Resize(side, interpolation=interpolation))
    if getattr(processor, "do_center_crop", False):
        steps.append(T.CenterCrop((processor.crop_size["height"], processor.crop_size["width"])))
    steps.append(T.ToTensor())
    if processor.do_normalize:
        steps.append(T.Normalize(processor.image_mean, processor.image_std))
    return T.Compose(steps)
