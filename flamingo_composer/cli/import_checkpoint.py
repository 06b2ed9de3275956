"""Convert a released OpenFlamingo `checkpoint.pt` into our trainable-only state dict.

    flamingo-import --config yamls/run.yaml --checkpoint checkpoint.pt --out trainable.pt

`--config` is a training recipe (its `model:` section is used) or a model config alone (the keys of
FlamingoModelConfig: vision, lm, tokenizer, cross_attn_every_n_layers, ...); it must describe the same
architecture and tokenizer the checkpoint was trained with (e.g. ViT-L-14 + the recipe's LM). The model is built,
the checkpoint loaded through flamingo_composer.models.reference_checkpoint (every key must map, shapes must
match, aliases must agree), and the trainable parameters (perceiver, cross-attention blocks, `<image>` /
`<|endofchunk|>` rows) are written under our names. A full reference state dict (`full_state.pt` layout) is
accepted too. Exit status 1 when the checkpoint does not fit the model (all problems are listed), 2 on bad
arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="training YAML (uses its `model:` section) or model config")
    parser.add_argument("--checkpoint", required=True, help="reference checkpoint.pt (or full state dict)")
    parser.add_argument("--out", required=True, help="where to write the trainable-only state dict (.pt)")
    parser.add_argument(
        "--layout", default="auto", choices=["auto", "full", "checkpoint"],
        help="source layout; auto = 'full' when it holds vision_encoder.* keys, else 'checkpoint'",
    )
    return parser.parse_args(argv)


def read_model_config(path: str | Path):
    """YAML/JSON file -> FlamingoModelConfig: a recipe's `model:` section, or the whole file as a model config."""
    from omegaconf import OmegaConf

    from flamingo_composer.models.factory import FlamingoModelConfig
    from flamingo_composer.training.recipe import load_recipe_yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path} does not exist")
    data = OmegaConf.to_container(load_recipe_yaml(path), resolve=True)  # a recipe's `base:` files merged in
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping at the top level")
    if isinstance(data.get("model"), dict):
        data = data["model"]
    return FlamingoModelConfig.from_dict(data)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Imported after parsing, so --help does not wait for torch and transformers.
    import torch

    from flamingo_composer.models.factory import build_flamingo
    from flamingo_composer.models.reference_checkpoint import (
        ReferenceCheckpointError,
        convert_reference_checkpoint,
    )

    try:
        model_cfg = read_model_config(args.config)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model = build_flamingo(model_cfg).model
    try:
        trainable, report = convert_reference_checkpoint(model, args.checkpoint, layout=args.layout)
    except (ReferenceCheckpointError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(trainable, out)
    n_params = sum(t.numel() for t in trainable.values())
    print(report.summary())
    print(f"wrote {len(trainable)} trainable tensors ({n_params:,} parameters) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
