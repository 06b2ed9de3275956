"""Export our trainable-only checkpoint as a released-format OpenFlamingo `checkpoint.pt`.

    flamingo-export CKPT --config RECIPE --out checkpoint.pt

CKPT is a Composer checkpoint of a run (`save_folder/ep0-ba1000-rank0.pt`, full state dict type: `state.model`
holds the perceiver, cross-attention blocks and new-token rows) or a plain trainable-only state dict (what
`flamingo-import` writes). RECIPE is the run's training YAML (its `model:` section) or a model config:
the frozen CLIP and LM are rebuilt from it, as training does.

The output is what the reference's `filter_state_dict_to_trainable` saves and its evaluation code loads with
`model.load_state_dict(torch.load(path), strict=False)`: a plain state dict under the reference's key names,
with the perceiver, the gated cross-attention layers, the whole input-embedding matrix with the trained
`<image>` / `<|endofchunk|>` rows (and the tied head for MPT), plus the LM's other "*embed*" parameters.
`--weights` picks, for a run with the `ema` algorithm, its average (ema) or its trained weights (raw); the default
takes the average when CKPT holds one. A model with qk-norm (model.qk_norm: true) is refused: the released format
has no such weights. Every model key of CKPT must map onto the recipe's model (unknown keys, shape mismatches and
missing trainable parameters are listed); what CKPT holds besides model weights (optimizer, scheduler, RNG, ...)
is reported as not exported. Exit status 1 when CKPT does not fit the recipe, 2 on bad arguments or an unreadable CKPT.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from collections.abc import Mapping
from pathlib import Path

# The ComposerModel's child holding our Flamingo: Composer checkpoints name its weights `model.<our key>`.
COMPOSER_MODEL_PREFIX = "model."


class CheckpointFormatError(ValueError):
    """CKPT is not a checkpoint this tool can read (the message says what it is and what to do)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="Composer checkpoint (.pt) or trainable-only state dict of our model")
    parser.add_argument("--config", required=True, help="the run's training YAML (uses `model:`) or a model config")
    parser.add_argument("--out", required=True, help="where to write the released-format checkpoint.pt")
    parser.add_argument(
        "--weights", choices=["auto", "ema", "raw"], default="auto",
        help="the EMA average (ema) or the trained weights (raw); default %(default)s = the EMA average when CKPT "
        "holds one (a run with the `ema` algorithm), else raw",
    )  # fmt: skip
    return parser.parse_args(argv)


def _torch_load(path: Path):
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Composer checkpoints pickle non-tensor state (timestamps, RNG); CKPT is the user's own run output.
        return torch.load(path, map_location="cpu", weights_only=False)


def read_model_weights(path: str | Path, weights: str = "auto") -> tuple[dict, list[str], str]:
    """CKPT -> (our model's weights under our key names, the other top-level state it holds, not exported, and
    which weights: 'ema' or 'raw', see `--weights`)."""
    from flamingo_composer.training.ema import checkpoint_weights

    path = Path(path)
    if path.is_dir():
        raise CheckpointFormatError(
            f"{path} is a folder (a sharded checkpoint): save with fsdp_config.state_dict_type: full, or load it "
            "into a run and save a full checkpoint, then export that file"
        )
    if not path.is_file():
        raise CheckpointFormatError(f"checkpoint {path} does not exist")
    raw = _torch_load(path)
    if not isinstance(raw, Mapping):
        raise CheckpointFormatError(f"{path}: expected a Composer checkpoint or a state dict, got {type(raw).__name__}")
    state = raw.get("state")
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        chosen_weights, chosen = checkpoint_weights(raw, weights)
        model_weights = {}
        for key, value in chosen_weights.items():
            if not key.startswith(COMPOSER_MODEL_PREFIX):
                raise CheckpointFormatError(
                    f"{path}: model key {key!r} is not under {COMPOSER_MODEL_PREFIX!r} (not a FlamingoComposerModel)"
                )
            model_weights[key[len(COMPOSER_MODEL_PREFIX):]] = value
        other = sorted(k for k in state if k != "model") + sorted(k for k in raw if k != "state")
        return model_weights, other, chosen
    if weights == "ema":
        raise CheckpointFormatError(f"{path}: a plain state dict holds no EMA weights (use --weights raw)")
    return dict(raw), [], "raw"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from flamingo_composer.cli.import_checkpoint import read_model_config
    from flamingo_composer.models.factory import build_flamingo
    from flamingo_composer.models.reference_checkpoint import (
        QK_NORM_REFUSAL,
        ReferenceCheckpointError,
        load_reference_state_dict,
        released_state_dict,
    )

    try:
        model_cfg = read_model_config(args.config)
        weights, not_exported, chosen = read_model_weights(args.checkpoint, args.weights)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if model_cfg.qk_norm:
        print(f"error: {args.config}: {QK_NORM_REFUSAL}: the released format cannot hold this model", file=sys.stderr)
        return 1
    model = build_flamingo(model_cfg).model
    try:
        report = load_reference_state_dict(model, weights, layout="checkpoint")
    except ReferenceCheckpointError as exc:
        print(f"error: {args.checkpoint} does not fit the model of {args.config}:\n{exc}", file=sys.stderr)
        return 1
    released = released_state_dict(model)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(released, out)

    embedding = model.lang_encoder.get_input_embeddings()
    embed_key = next(f"{name}.weight" for name, module in model.named_modules() if module is embedding)
    # Not from CKPT: frozen "*embed*" weights and buffers (the embedding matrix and a tied head carry trained rows).
    from_recipe = sorted(k for k in released if k not in report.loaded and released[k] is not released[embed_key])
    print(f"{args.checkpoint}: {len(weights)} model tensors ({chosen} weights), all mapped ({len(report.loaded)} "
          "loaded)")  # fmt: skip
    if not_exported:
        print(f"not exported (training state): {', '.join(not_exported)}")
    if from_recipe:
        print(f"from the recipe's frozen LM (kept as the reference keeps them): {', '.join(from_recipe)}")
    n_params = sum(t.numel() for k, t in released.items() if k not in from_recipe)
    print(f"wrote {len(released)} tensors ({n_params:,} trained or embedding parameters) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
