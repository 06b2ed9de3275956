"""The reference OpenFlamingo package (open-flamingo 2.0.1) as a live oracle: same tiny model, its data, its step.

Test-only: the runtime package never imports this module or `open_flamingo` (installed `--no-deps` beside
`einops-exts`, see the Makefile). It is used by the parity tests and by `benchmarks/bench_vs_reference.py`.

    pair = build_pair(tiny_model_config("llama", cross_attn_every_n_layers=2), workdir, seed=0)
    batch = reference_batch(pair, seed=0)          # built by the reference's own preprocessing
    step = reference_train_step(pair, batch)       # one step of its real `train_one_epoch` (1-process gloo DDP)

`build_pair` writes our model config's components to `workdir` in the forms the reference's
`create_model_and_transforms` reads (an open_clip JSON config registered with `add_model_config`, the LM saved with
`save_pretrained`, the tokenizer saved with `save_pretrained`), builds the reference model from them, and builds
ours from the very same files and loads the reference's full state into it, so both hold identical weights.

Why the step tests compare in float64 (measured with this module, CPU, 8 seeds; LLaMA hidden 64, 4 layers,
initializer_range 0.3, cross-attention before every layer = 114 gradient tensors, MMC4 128 tokens): the number of
fp32 gradient tensors within 1e-5 x max|g| of the float64 step is a per-seed lottery, for the reference
(106, 104, 11, 110, 50, 48, 93, 113) as for us (107, 103, 110, 113, 89, 16, 111, 113). The LM amplifies fp32
rounding ~16x in its first layer at that init (relative error of the hidden states 1.7e-7 -> 2.7e-6; logits 7.2e-6,
vs 1.5e-6 for GPT-NeoX and 4.8e-7 for LLaMA at init 0.02), and the scalar gate gradients cancel to ~1e-6. In
float64 the two implementations agree to ~1e-14 relative (every seed within 1e-9): same math, same op order where
it matters; the remaining differences (SDPA vs einsum + softmax, CE sum / N vs mean) are rounding-level.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import importlib
import io
import json
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from flamingo_composer.models.factory import (
    FlamingoBundle,
    FlamingoModelConfig,
    LMConfig,
    TokenizerConfig,
    VisionConfig,
    build_flamingo,
    build_lm,
    build_tokenizer,
)
from flamingo_composer.models.reference_checkpoint import LoadReport, load_reference_state_dict

REFERENCE_VERSION = "2.0.1"
# The reference's Flamingo has fixed perceiver / cross-attention sizes (its factory exposes none of them).
REFERENCE_PERCEIVER = {
    "perceiver_depth": 6, "perceiver_heads": 8, "perceiver_dim_head": 64, "perceiver_num_latents": 64
}
# Settings of the reference's training step as its train.py defaults / the released recipes use them.
REFERENCE_STEP = {"lr": 1e-4, "weight_decay": 0.1, "loss_multiplier_laion": 0.2, "loss_multiplier_mmc4": 1.0}


# ------------------------------------------------------------------------------------------- the package


def reference_modules() -> SimpleNamespace:
    """`open_flamingo` (factory, Flamingo) and its training code `open_flamingo.train.{data,train_utils}`.

    Its `train/` folder goes on sys.path: `train/data.py` imports `data_utils` script-style.
    """
    try:
        open_flamingo = importlib.import_module("open_flamingo")
    except ImportError as exc:  # pragma: no cover - a dev install always has it
        raise ImportError(
            f"the reference oracle needs open-flamingo=={REFERENCE_VERSION} and einops-exts==0.0.4 installed with "
            "--no-deps (make test does it)"
        ) from exc
    train_dir = str(Path(open_flamingo.__file__).parent / "train")
    if train_dir not in sys.path:
        sys.path.append(train_dir)
    return SimpleNamespace(
        package=open_flamingo,
        data=importlib.import_module("open_flamingo.train.data"),
        train_utils=importlib.import_module("open_flamingo.train.train_utils"),
    )


# ------------------------------------------------------------------------------------------------ models


@dataclass
class ReferenceFiles:
    """Where `write_reference_files` put the components, and the open_clip name the vision config has."""

    vision_name: str
    vision_json: Path
    lm_dir: Path
    tokenizer_dir: Path


def _vision_json(vision: VisionConfig) -> dict:
    """The open_clip model config of `vision`, with `final_ln_after_pool` set to our patch-token semantics."""
    if vision.custom_config is not None:
        model_cfg = copy.deepcopy(dict(vision.custom_config))
    elif vision.config_path is not None:
        model_cfg = json.loads(Path(vision.config_path).read_text())
    else:
        raise ValueError("reference oracle: vision needs custom_config or config_path (hub ViTs are not offline)")
    model_cfg.setdefault("embed_dim", 32)
    model_cfg.setdefault("text_cfg", {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1})
    # open_clip 3.x gives the reference's `output_tokens` without ln_post only when final_ln_after_pool is set.
    model_cfg["vision_cfg"] = {**model_cfg["vision_cfg"], "final_ln_after_pool": not vision.ln_post_on_tokens}
    return model_cfg


def write_reference_files(cfg: FlamingoModelConfig, workdir: str | Path, *, name: str = "oracle") -> ReferenceFiles:
    """Our model config -> files the reference factory reads; the LM is initialised under `cfg.seed`."""
    import open_clip

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    vision_json = workdir / f"{name}-vision.json"  # its stem is the open_clip model name
    vision_json.write_text(json.dumps(_vision_json(cfg.vision)))
    open_clip.add_model_config(vision_json)

    tokenizer_dir, lm_dir = workdir / f"{name}-tokenizer", workdir / f"{name}-lm"
    build_tokenizer(cfg.tokenizer).save_pretrained(tokenizer_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed or 0)
        build_lm(cfg.lm).save_pretrained(lm_dir, safe_serialization=True)
    return ReferenceFiles(vision_json.stem, vision_json, lm_dir, tokenizer_dir)


def build_reference(files: ReferenceFiles, *, cross_attn_every_n_layers: int, seed: int):
    """The reference's `create_model_and_transforms` on the files: (Flamingo, image processor, tokenizer)."""
    ref = reference_modules()
    with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(io.StringIO()):
        torch.manual_seed(seed)
        return ref.package.create_model_and_transforms(
            clip_vision_encoder_path=files.vision_name,
            clip_vision_encoder_pretrained=None,
            lang_encoder_path=str(files.lm_dir),
            tokenizer_path=str(files.tokenizer_dir),
            cross_attn_every_n_layers=cross_attn_every_n_layers,
            use_local_files=True,
        )


def ours_config(cfg: FlamingoModelConfig, files: ReferenceFiles) -> FlamingoModelConfig:
    """`cfg` reading the reference's files (same ViT config, LM weights and tokenizer), reference perceiver sizes."""
    return replace(
        cfg,
        vision=VisionConfig(config_path=str(files.vision_json), ln_post_on_tokens=cfg.vision.ln_post_on_tokens),
        lm=LMConfig(name=str(files.lm_dir)),
        tokenizer=TokenizerConfig(name=str(files.tokenizer_dir)),
    )


def set_reference_gates(model: nn.Module, seed: int, low: float = 0.3, high: float = 0.9) -> None:
    """Random non-zero gates (signs mixed), so the images and every block matter to the outputs and gradients."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("attn_gate", "ff_gate")):
                sign = 1.0 if torch.rand((), generator=gen) < 0.7 else -1.0
                param.fill_(sign * (low + (high - low) * torch.rand((), generator=gen).item()))


@dataclass
class OraclePair:
    """The reference model and ours with identical weights, built from the same files."""

    reference: nn.Module  # open_flamingo.Flamingo
    image_processor: Any  # the reference's (open_clip eval) transform
    tokenizer: Any  # the reference's tokenizer (new tokens added)
    ours: FlamingoBundle
    load_report: LoadReport
    files: ReferenceFiles
    config: FlamingoModelConfig  # ours, as built
    seed: int
    extras: dict = field(default_factory=dict)

    def to(self, dtype: torch.dtype) -> OraclePair:
        """Both models in `dtype` (e.g. torch.float64, where fp32 summation-order noise vanishes).

        transformers' loss casts logits to fp32 (`logits.float()`), which would put one fp32 op back into a float64
        step (its 1-ulp flips differ between CPUs); the reference LM gets transformers' loss without that cast.
        """
        self.reference.to(dtype)
        self.ours.model.to(dtype)
        if dtype == torch.float64:
            self.reference.lang_encoder.loss_function = causal_lm_loss_in_logits_dtype
        return self


def causal_lm_loss_in_logits_dtype(logits, labels, vocab_size: int, num_items_in_batch=None, ignore_index: int = -100,
                                   shift_labels=None, **kwargs):  # fmt: skip
    """transformers' `ForCausalLMLoss` (4.53) minus its `logits.float()`: the same shift, flatten and mean."""
    from transformers.loss.loss_utils import fixed_cross_entropy

    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:].contiguous()
    flat_labels = shift_labels.view(-1).to(logits.device)
    return fixed_cross_entropy(logits.view(-1, vocab_size), flat_labels, num_items_in_batch, ignore_index, **kwargs)


def build_pair_from_recipe(recipe: str | Path, workdir: str | Path, *, seed: int = 0, gates: bool = True) -> OraclePair:
    """`build_pair` on the `model:` section of a training YAML (e.g. yamls/bench-cpu.yaml); data paths are not read."""
    from flamingo_composer.cli.import_checkpoint import read_model_config

    return build_pair(read_model_config(recipe), workdir, seed=seed, gates=gates)


def build_pair(cfg: FlamingoModelConfig, workdir: str | Path, *, seed: int = 0, gates: bool = True) -> OraclePair:
    """Reference model + our model from the same tiny offline config (`cfg`: ours, e.g. `tiny_model_config(...)`).

    The reference fixes the perceiver at depth 6, 8 heads x 64, 64 latents: `cfg`'s perceiver sizes are replaced
    by those. `seed` drives the LM init, the reference's init of the perceiver and blocks, and the gate values;
    our model then receives the reference's full state dict (every key must map).
    """
    cfg = replace(cfg, seed=seed, **REFERENCE_PERCEIVER)
    files = write_reference_files(cfg, workdir)
    reference, image_processor, tokenizer = build_reference(
        files, cross_attn_every_n_layers=cfg.cross_attn_every_n_layers, seed=seed
    )
    if gates:
        set_reference_gates(reference, seed)
    our_cfg = ours_config(cfg, files)
    ours = build_flamingo(our_cfg)
    if ours.tokenizer.get_vocab() != tokenizer.get_vocab():
        raise AssertionError("reference oracle: our tokenizer and the reference's differ after adding the new tokens")
    report = load_reference_state_dict(ours.model, reference.state_dict(), layout="full")
    return OraclePair(reference, image_processor, tokenizer, ours, report, files, our_cfg, seed)


# -------------------------------------------------------------------------------------------------- data


def _noise_png(rng: np.random.Generator, size: int) -> bytes:
    """A random RGB PNG of >= 11 kB (the reference drops MMC4 images of 10 kB or less)."""
    from PIL import Image

    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _words(rng: np.random.Generator, n: int) -> str:
    from flamingo_composer.vocab import WORDS

    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n))


def raw_samples(seed: int, *, laion_rows: int = 4, mmc4_rows: int = 2, max_images: int = 3) -> dict:
    """Raw LAION pairs (PIL image, caption) and MMC4 JSON documents of in-vocabulary words, for `seed`.

    Every document has 2..max_images images above the similarity threshold, each matched (argmax) to its own
    sentence, so the reference's random single-image rejection never fires.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    laion = []
    for row in range(laion_rows):
        image = Image.open(io.BytesIO(_noise_png(rng, 40))).convert("RGB")
        laion.append((image, _words(rng, 2 + (3 * row + int(rng.integers(0, 4))) % 12)))
    docs = []
    for row in range(mmc4_rows):
        n_images = 2 + row % (max_images - 1)
        sentences = [_words(rng, 2 + int(rng.integers(0, 4))) for _ in range(n_images + 2)]
        matched = sorted(rng.choice(len(sentences), n_images, replace=False).tolist())
        sim = rng.uniform(0.1, 0.2, (n_images, len(sentences)))
        for i, j in enumerate(matched):
            sim[i, j] = 0.3
        docs.append(json.dumps({
            "text_list": sentences,
            "image_info": [{"image_base64": base64.b64encode(_noise_png(rng, 64)).decode()} for _ in matched],
            "similarity_matrix": sim.tolist(),
        }))
    return {"laion": laion, "mmc4": docs}


@dataclass
class ReferenceBatch:
    """One batch of each dataset in the reference's loader format (what `train_one_epoch` iterates over)."""

    laion: tuple  # (images (B, 3, H, W), (input_ids (B, L), attention_mask (B, L)))
    mmc4: tuple  # (images (B, T, 3, H, W), [(input_ids (1, L), attention_mask (1, L)) per document])


def reference_batch(pair: OraclePair, seed: int, *, mmc4_max_tokens: int = 64, max_images: int = 3,
                    laion_rows: int = 4, mmc4_rows: int = 2) -> ReferenceBatch:
    """Raw samples through the reference's own preprocessing (`open_flamingo.train.data`), batched as its loaders."""
    data = reference_modules().data
    raw = raw_samples(seed, laion_rows=laion_rows, mmc4_rows=mmc4_rows, max_images=max_images)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # its RandomHorizontalFlip draws from the global RNG
        random.seed(seed)
        images = data.preprocess_image([image for image, _ in raw["laion"]], pair.image_processor)
        text = data.preprocess_laion_text([caption for _, caption in raw["laion"]], pair.tokenizer)
        docs = [
            data.preprocess_interleaved(
                (doc,), pair.tokenizer, pair.image_processor, sim_threshold=0.24, min_num_images=1,
                max_num_images=max_images, max_tokens=mmc4_max_tokens,
            )
            for doc in raw["mmc4"]
        ]
    return ReferenceBatch(
        laion=(images, text),
        mmc4=(torch.stack([images for images, _ in docs]), [tokens for _, tokens in docs]),
    )


def without_trailing_padding(batch: ReferenceBatch) -> ReferenceBatch:
    """The MMC4 documents cut after the last column holding a real token of any document, as our microbatches are
    (`data.dataspec._trim_padding`). For float64 steps with MPT: transformers' MPT attention takes its softmax in
    fp32, whose reduction order depends on the row length; with equal lengths both sides run the same fp32 op."""
    images, tokens = batch.mmc4
    length = max(int(mask[0].nonzero().max()) + 1 for _, mask in tokens)
    return replace(batch, mmc4=(images, [(ids[:, :length], mask[:, :length]) for ids, mask in tokens]))


def ours_batch(pair: OraclePair, batch: ReferenceBatch, dtype: torch.dtype = torch.float32) -> dict:
    """The same tensors in our schema, labels from OUR masking (`flamingo_composer.data.dual_loader`): compact
    float `images` (N, 3, H, W) with `image_mask` (B, T_img); `reference_vision_x(sub)` gives the reference's
    padded form of them back."""
    from flamingo_composer.data.kinds import INTERLEAVED, PAIRS
    from flamingo_composer.special_tokens import SpecialTokens

    special = SpecialTokens.from_tokenizer(pair.ours.tokenizer)
    images, (ids, mask) = batch.laion
    laion = [
        {"input_ids": ids[i], "attention_mask": mask[i], "images": images[i : i + 1]}  # (1, 3, H, W)
        for i in range(ids.shape[0])
    ]
    doc_images, tokens = batch.mmc4
    mmc4 = []
    for i, (ids, mask) in enumerate(tokens):
        image_mask = doc_images[i].flatten(1).ne(0).any(-1)  # (T,): the reference pads a document with zero images
        mmc4.append({
            "input_ids": ids[0],
            "attention_mask": mask[0],
            "images": doc_images[i][image_mask],  # (n_i, 3, H, W)
            "image_mask": image_mask,
        })
    out = {"laion": PAIRS.collate(laion, special), "mmc4": INTERLEAVED.collate(mmc4, special)}
    for sub in out.values():
        sub["images"] = sub["images"].to(dtype)
    return out


def reference_vision_x(sub: dict) -> torch.Tensor:
    """A sub-batch's compact images in the reference's padded form: vision_x (B, T_img, 1, 3, H, W), empty slots
    zero (what the reference's own batch holds)."""
    from flamingo_composer.models.reference_images import padded_vision_x

    return padded_vision_x(sub["images"], sub["image_mask"])


# -------------------------------------------------------------------------------------------------- step


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Run with torch's default dtype set to `dtype` (float64 steps: transformers' MPT builds its causal mask with
    `torch.full(..., torch.finfo(float64).min)` in the default dtype, which overflows in float32)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@contextlib.contextmanager
def single_process_group() -> Iterator[None]:
    """A 1-process gloo group for the reference's DDP-wrapped step (left as it was found)."""
    import torch.distributed as tdist

    if tdist.is_initialized():
        yield
        return
    tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        tdist.destroy_process_group()


class _OneBatch:
    """A loader of one batch with the `num_batches` attribute `train_one_epoch` reads."""

    num_batches = 1

    def __init__(self, batch):
        self.batch = batch

    def __iter__(self):
        return iter([self.batch])


def reference_optimizer(model: nn.Module, *, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """torch AdamW as the reference's train.py builds it (non-FSDP): decay only on gated cross-attention params."""
    with_wd, without_wd = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (with_wd if "gated_cross_attn" in name else without_wd).append(param)
    return torch.optim.AdamW(
        [{"params": with_wd, "weight_decay": weight_decay}, {"params": without_wd, "weight_decay": 0.0}], lr=lr
    )


@dataclass
class ReferenceStep:
    """What one `train_one_epoch` step did: the inputs and labels it fed its model, losses, grads, new weights."""

    inputs: dict[str, dict[str, torch.Tensor]]  # {'laion'|'mmc4': {vision_x, lang_x, attention_mask, labels}}
    losses: dict[str, float]  # {'laion', 'mmc4'}: the model's losses
    grads: dict[str, torch.Tensor]  # name -> gradient the optimizer saw (after masking and clipping)
    before: dict[str, torch.Tensor]  # trainable parameters before the step
    after: dict[str, torch.Tensor]  # trainable parameters after the step


def reference_train_step(pair: OraclePair, batch: ReferenceBatch, **settings: float) -> ReferenceStep:
    """One optimizer step of the reference's real `train_one_epoch` (DDP over a 1-process gloo group, CPU).

    settings: lr, weight_decay, loss_multiplier_laion, loss_multiplier_mmc4 (defaults: REFERENCE_STEP).
    The model runs in whatever dtype it has (fp32 `precision`: no autocast, no casts of the batch).
    """
    from torch.nn.parallel import DistributedDataParallel
    from transformers import get_constant_schedule_with_warmup

    settings = {**REFERENCE_STEP, **settings}
    train_utils = reference_modules().train_utils
    model = pair.reference
    dtype = next(model.parameters()).dtype
    laion_images, laion_text = batch.laion
    mmc4_images, mmc4_text = batch.mmc4
    loaders = (_OneBatch((laion_images.to(dtype), laion_text)), _OneBatch((mmc4_images.to(dtype), mmc4_text)))
    args = SimpleNamespace(
        num_epochs=1, precision="fp32", fsdp=False, fsdp_use_orig_params=False, rank=0, world_size=1,
        gradient_accumulation_steps=1, freeze_lm_embeddings=False, report_to_wandb=False, logging_steps=10**9,
        batch_size_laion=laion_images.shape[0], batch_size_mmc4=mmc4_images.shape[0],
        loss_multiplier_laion=settings["loss_multiplier_laion"], loss_multiplier_mmc4=settings["loss_multiplier_mmc4"],
    )

    calls: list[dict] = []
    losses: list[float] = []
    grads: dict[str, torch.Tensor] = {}
    names = {param: name for name, param in model.named_parameters() if param.requires_grad}

    def record_inputs(module, args_, kwargs):
        calls.append({k: v.detach().clone() for k, v in kwargs.items() if torch.is_tensor(v)})

    def record_loss(module, args_, kwargs, output):
        losses.append(output[0].item())

    def record_grads(optimizer, args_, kwargs):
        for group in optimizer.param_groups:
            for param in group["params"]:
                grads[names[param]] = param.grad.detach().clone()

    handles = [
        model.register_forward_pre_hook(record_inputs, with_kwargs=True),
        model.register_forward_hook(record_loss, with_kwargs=True),
    ]
    before = {name: p.detach().clone() for p, name in names.items()}
    try:
        with single_process_group(), contextlib.redirect_stderr(io.StringIO()):
            ddp_model = DistributedDataParallel(model)
            optimizer = reference_optimizer(ddp_model, lr=settings["lr"], weight_decay=settings["weight_decay"])
            optimizer.register_step_pre_hook(record_grads)
            scheduler = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=0)
            train_utils.train_one_epoch(
                args=args, model=ddp_model, epoch=0, laion_loader=loaders[0], mmc4_loader=loaders[1],
                tokenizer=pair.tokenizer, optimizer=optimizer, lr_scheduler=scheduler, device_id="cpu", wandb=None,
            )
    finally:
        for handle in handles:
            handle.remove()
    grads = {name.removeprefix("module."): g for name, g in grads.items()}
    after = {name: p.detach().clone() for p, name in names.items()}
    keys = ("laion", "mmc4")
    return ReferenceStep(dict(zip(keys, calls)), dict(zip(keys, losses)), grads, before, after)


# ------------------------------------------------------------------------------------------------ naming


def new_token_rows_key(pair: OraclePair) -> str:
    """Our name of the spliced `<|endofchunk|>` / `<image>` rows (the reference keeps them in its embedding)."""
    rows = pair.ours.model.lang_encoder.get_input_embeddings().new_token_rows
    return next(name for name, param in pair.ours.model.named_parameters() if param is rows)


def reference_embedding_key(pair: OraclePair) -> str:
    """The reference's name of its (trainable) input-embedding weight."""
    embedding = pair.reference.lang_encoder.get_input_embeddings()
    return next(f"{name}.weight" for name, module in pair.reference.named_modules() if module is embedding)


def trainable_as_ours(pair: OraclePair, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reference trainable tensors (grads, weights) under our names: its (V, D) embedding -> our (2, D) rows."""
    ids = pair.ours.model.lang_encoder.get_input_embeddings().new_token_ids.tolist()
    out = dict(tensors)
    out[new_token_rows_key(pair)] = out.pop(reference_embedding_key(pair))[ids]  # (2, D)
    return out


# ------------------------------------------------------------------------------------------------ evaluation


def reference_evaluate_module():
    """The reference's open_flamingo/eval/evaluate.py, loaded script-style as it runs (its folder on sys.path for its
    own `import utils`, `from eval_datasets import ...`), under the module name `reference_evaluate`."""
    import importlib.util

    eval_dir = Path(reference_modules().package.__file__).parent / "eval"
    if "reference_evaluate" in sys.modules:
        return sys.modules["reference_evaluate"]
    if str(eval_dir) not in sys.path:
        sys.path.insert(0, str(eval_dir))
    spec = importlib.util.spec_from_file_location("reference_evaluate", eval_dir / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    with contextlib.redirect_stdout(io.StringIO()):
        spec.loader.exec_module(module)
    sys.modules["reference_evaluate"] = module
    return module


class ReferenceEvalModel:
    """The reference's OpenFlamingo `EvalModel` for its evaluate.py (open_flamingo/eval/models/open_flamingo.py of
    2.0.1, which the 2.0.1 wheel does not ship), over the pair's reference model, fp32, CPU: the prompt strings, the
    image and text preparation (left padding, max 2,000 tokens) and `get_rank_classifications` with and without
    its KV cache (cache_media, the prompt once, then each class name token by token with the cache; or prompt +
    class name in one forward). Its prompt cache was a tuple under the transformers it pinned (never changed by
    a forward); transformers 4.53 returns a DynamicCache that grows in place, so each class name gets a copy.
    `calls` records every `get_rank_classifications` call: (batch_text, class log-likelihoods (B, C))."""

    def __init__(self, pair: OraclePair):
        self.model, self.image_processor, self.tokenizer = pair.reference.eval(), pair.image_processor, pair.tokenizer
        self.tokenizer.padding_side = "left"
        self.device = "cpu"
        self.calls: list[tuple[list[str], torch.Tensor]] = []

    def get_imagenet_prompt(self, label=None) -> str:
        return f"<image>Output:{label if label is not None else ''}{'<|endofchunk|>' if label is not None else ''}"

    def get_hateful_memes_prompt(self, text, label=None) -> str:
        return (f"<image>is an image with: '{text}' written on it. Is it hateful? Answer:"
                f"{label if label is not None else ''}{'<|endofchunk|>' if label is not None else ''}")  # fmt: skip

    def _images(self, batch) -> torch.Tensor:
        per_example = max(len(x) for x in batch)
        out = None
        for i, example in enumerate(batch):
            for j, image in enumerate(example):
                tensor = self.image_processor(image)
                if out is None:
                    out = torch.zeros((len(batch), per_example, 1, *tensor.shape), dtype=tensor.dtype)
                out[i, j, 0] = tensor
        return out

    def _text(self, batch):
        enc = self.tokenizer(batch, padding="longest", truncation=True, return_tensors="pt", max_length=2000)
        return enc["input_ids"], enc["attention_mask"].bool()

    @torch.inference_mode()
    def get_rank_classifications(self, batch_text, batch_images, all_class_names, use_cache, normalize_length):
        images = self._images(batch_images)
        ids, mask = self._text(batch_text)
        if use_cache:
            self.model.cache_media(input_ids=ids, vision_x=images)
            prompt = self.model(vision_x=None, lang_x=ids, attention_mask=mask, clear_conditioned_layers=False,
                                use_cache=True)  # fmt: skip
        scores = []
        for name in all_class_names:
            tokens = self.tokenizer(name, add_special_tokens=False, return_tensors="pt")["input_ids"]
            tokens = tokens.repeat(len(batch_text), 1)  # (B, n)
            n = tokens.shape[1]
            if use_cache:
                cache, steps = copy.deepcopy(prompt.past_key_values), []
                for t in range(n):
                    out = self.model(vision_x=None, lang_x=tokens[:, t : t + 1], attention_mask=None,
                                     clear_conditioned_layers=False, past_key_values=cache, use_cache=True)  # fmt: skip
                    cache = out.past_key_values
                    steps.append(out.logits)
                logits = torch.cat([prompt.logits, *steps], dim=1)
            else:
                logits = self.model(vision_x=images, lang_x=torch.cat([ids, tokens], dim=1),
                                    attention_mask=torch.cat([mask, torch.ones_like(tokens).bool()], dim=1),
                                    clear_conditioned_layers=True).logits  # fmt: skip
            logprobs = torch.log_softmax(logits, dim=-1)[:, -n - 1 : -1, :]
            per_token = torch.gather(logprobs, 2, tokens[:, :, None]).squeeze(-1)  # (B, n)
            scores.append(per_token.mean(dim=1) if normalize_length else per_token.sum(dim=1))
        self.model.uncache_media()
        result = torch.vstack(scores).T.cpu()  # (B, C)
        self.calls.append((list(batch_text), result.clone()))
        return result


def reference_classification(pair: OraclePair, dataset: str, *, shots: int, seed: int, batch_size: int,
                             query_set_size: int, use_cache: bool, ensembling: bool, imagenet_root: str | None = None,
                             imagenet_classnames: list[str] | None = None,
                             hateful_memes: dict | None = None):  # fmt: skip
    """The reference's own `evaluate_classification` (one rank) on the pair's reference model: (score, the eval
    model with its recorded calls). ImageNet runs over `imagenet_classnames` (its module-level list replaced, so a
    tiny tree of a few classes is ranked against a few names); hateful_memes: {'images', 'train', 'test'} paths.

    Its ImageNet path builds every query prompt with `batch["ocr"]`, a key its ImageNetDataset lacks (a KeyError in
    2.0.1): the dataset here adds `ocr: None` to each item, which the ImageNet prompt ignores; nothing else changes.
    """
    evaluate = reference_evaluate_module()

    class ImageNetWithOcr(evaluate.ImageNetDataset):
        def __getitem__(self, idx):
            return {**super().__getitem__(idx), "ocr": None}

    eval_model = ReferenceEvalModel(pair)
    args = SimpleNamespace(
        model="open_flamingo", num_samples=-1, batch_size=batch_size, query_set_size=query_set_size, rices=False,
        rank=0, world_size=1, imagenet_root=imagenet_root,
        hateful_memes_image_dir_path=(hateful_memes or {}).get("images"),
        hateful_memes_train_annotations_json_path=(hateful_memes or {}).get("train"),
        hateful_memes_test_annotations_json_path=(hateful_memes or {}).get("test"),
    )  # fmt: skip
    datasets = sys.modules["eval_datasets"]
    saved = (evaluate.IMAGENET_CLASSNAMES, datasets.IMAGENET_CLASSNAMES, evaluate.ImageNetDataset)
    evaluate.ImageNetDataset = ImageNetWithOcr
    if imagenet_classnames is not None:
        evaluate.IMAGENET_CLASSNAMES = datasets.IMAGENET_CLASSNAMES = list(imagenet_classnames)
    try:
        with single_process_group(), contextlib.redirect_stderr(io.StringIO()):
            score = evaluate.evaluate_classification(
                args, eval_model, seed=seed, num_shots=shots, dataset_name=dataset, no_kv_caching=not use_cache,
                use_prompt_ensembling=ensembling,
            )  # fmt: skip
    finally:
        evaluate.IMAGENET_CLASSNAMES, datasets.IMAGENET_CLASSNAMES, evaluate.ImageNetDataset = saved
    return score, eval_model
