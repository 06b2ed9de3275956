"""RICES: demonstrations retrieved by image similarity (the reference's rices.py), from the frozen vision tower's
pooled features or a separate open_clip model.

Features are L2-normalised pooled image embeddings; a query's demos are the k pool images of highest cosine
similarity, the most similar last (nearest the query, as the reference orders them). Ties go to the lower pool
index (a stable sort; the reference's argsort leaves them to the backend). The pool's features are computed once
and kept in a cache file with what they describe (pool size, a digest of the image paths, the tower), read back
when it matches and rebuilt otherwise; a bare (N, D) tensor, as the reference's caching script writes, is taken
when N matches.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence

import torch
from torch import nn

from flamingo_composer.eval.generation import load_image
from flamingo_composer.models.vision import TransformersVision, tower_adapter

log = logging.getLogger(__name__)


@torch.no_grad()
def pooled_features(tower: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """images (N, 3, H, W) -> pooled embeddings (N, D) of a tower as the model holds it, or of a whole open_clip
    model (`encode_image`). open_clip ViT (set to return tokens too): the pooled output; open_clip timm towers:
    their forward (trunk pool + head); transformers towers: `pooler_output`, else the mean of the last hidden
    states."""
    if hasattr(tower, "encode_image"):
        return tower.encode_image(images)
    adapter = tower_adapter(tower)
    if adapter is TransformersVision:
        out = tower(pixel_values=images)
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state.mean(dim=1)
    out = tower(images)
    return out[0] if isinstance(out, tuple) else out  # open_clip ViT with output_tokens: (pooled, tokens)


def normalized(features: torch.Tensor) -> torch.Tensor:
    return features / features.norm(dim=-1, keepdim=True)


def paths_digest(paths: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.encode("utf-8") + b"\0")
    return digest.hexdigest()


def tower_identity(tower: nn.Module) -> str:
    """Class, parameter count and a checksum of the first parameter: tells a cache made by another tower."""
    first = next(tower.parameters())
    checksum = float(first.detach().flatten()[:1024].double().sum())
    return f"{type(tower).__name__}:{sum(p.numel() for p in tower.parameters())}:{checksum:.6e}"


def nearest(query: torch.Tensor, pool: torch.Tensor, k: int) -> list[list[int]]:
    """query (B, D), pool (N, D), both normalised -> per query the k most similar pool indices, most similar last."""
    similarity = query.float() @ pool.float().T  # (B, N)
    top = torch.sort(similarity, dim=-1, descending=True, stable=True).indices[:, :k]  # (B, k)
    return [list(reversed(row)) for row in top.tolist()]


class Rices:
    """Retrieval over one demonstration pool (a train split's image paths) with one tower and its image transform."""

    def __init__(self, pool_paths: Sequence[str], tower: nn.Module, transform: Callable, *,
                 cache: str | None = None, batch_size: int = 32, device: torch.device | str = "cpu"):  # fmt: skip
        self.tower, self.transform = tower, transform
        self.batch_size, self.device = batch_size, torch.device(device)
        self.pool_paths = list(pool_paths)
        self.pool = self._pool_features(cache)  # (N, D), normalised
        self._query_features: dict[str, torch.Tensor] = {}

    def features(self, paths: Sequence[str]) -> torch.Tensor:
        """(len(paths), D) normalised features, computed in batches."""
        dtype = next(self.tower.parameters()).dtype
        out = []
        for start in range(0, len(paths), self.batch_size):
            images = torch.stack([self.transform(load_image(p)) for p in paths[start : start + self.batch_size]])
            out.append(normalized(pooled_features(self.tower, images.to(self.device, dtype)).float()).cpu())
        return torch.cat(out)

    def _pool_features(self, cache: str | None) -> torch.Tensor:
        meta = {"num": len(self.pool_paths), "paths": paths_digest(self.pool_paths),
                "tower": tower_identity(self.tower)}  # fmt: skip
        if cache is not None and os.path.isfile(cache):
            stored = torch.load(cache, map_location="cpu", weights_only=True)
            if torch.is_tensor(stored) and stored.shape[0] == meta["num"]:
                log.warning("RICES cache %s is a bare tensor: taken on its row count alone", cache)
                return stored.float()
            if isinstance(stored, dict) and stored.get("meta") == meta:
                return stored["features"]
            log.warning("RICES cache %s describes another pool or tower: computing the features again", cache)
        features = self.features(self.pool_paths)
        if cache is not None:
            tmp = f"{cache}.tmp"
            torch.save({"meta": meta, "features": features}, tmp)
            os.replace(tmp, cache)
        return features

    def retrieve(self, query_paths: Sequence[str], k: int) -> list[list[int]]:
        """Pool indices of each query's k demonstrations, most similar last (query features kept for reuse)."""
        missing = [p for p in dict.fromkeys(query_paths) if p not in self._query_features]
        if missing:
            for path, row in zip(missing, self.features(missing)):
                self._query_features[path] = row
        query = torch.stack([self._query_features[p] for p in query_paths])  # (B, D)
        return nearest(query, self.pool, k)


def build_rices(cfg, pool_paths: Sequence[str], *, vision_encoder: nn.Module | None, image_transform: Callable,
                device: torch.device | str = "cpu") -> Rices:  # fmt: skip
    """A `Rices` for an evaluator's `rices:` section (config.RicesConfig)."""
    if cfg.tower == "model":
        if vision_encoder is None:
            raise ValueError("rices.tower 'model' needs the model's vision tower (flamingo-evaluate); use 'open_clip'")
        tower, transform = vision_encoder, image_transform
    else:
        import open_clip

        model, _, transform = open_clip.create_model_and_transforms(
            cfg.open_clip_model, pretrained=cfg.open_clip_pretrained
        )
        tower = model.to(device).eval()
    return Rices(pool_paths, tower, transform, cache=cfg.cache, batch_size=cfg.batch_size, device=device)
