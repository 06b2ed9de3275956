"""Built-in synthetic LAION-style pairs and MMC4-style documents, rendered procedurally (no downloads).

Each image shows one or two coloured shapes at named positions on a textured background; its caption or the
sentences after it say exactly that, using only words of `flamingo_composer.vocab` (one tiny-tokenizer token each).
So the text is predictable only by looking at the right image: colours, shapes, positions and backgrounds are drawn
independently per image, and MMC4 documents list their images in shuffled `image_info` order, so a pipeline that
pairs the k-th `<image>` token with anything but the image matched to the k-th sentence gets the wrong picture.

Image size: images are 64 px JPEGs of 1.5-5 kB, far below MMC4's 11,000-byte minimum-size filter (a 64 px JPEG
cannot reach it without being mostly noise), so recipes on this data set `min_image_bytes` low: use
`SYNTHETIC_MIN_IMAGE_BYTES` (also written to manifest.json), which every generated image exceeds.

Layout under the output folder (flamingo-make-synthetic-data writes it):
    wds/laion/train-{000000..N}.tar, wds/laion/val-000000.tar     KEY.jpg, KEY.txt, KEY.json (img2dataset layout)
    wds/mmc4/train-{000000..N}.tar, wds/mmc4/val-*.tar            KEY.json (text_list, image_info, similarity_matrix)
    mds/laion/{train,val}/, mds/mmc4/{train,val}/                 MDS, columns of data/mds.py
    manifest.json                                                 counts, shard lists, seed, recommended filter
Deterministic: the same seed and counts give byte-identical files.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from flamingo_composer import vocab
from flamingo_composer.data.mds import LAION_MDS_COLUMNS, MMC4_MDS_COLUMNS, mmc4_doc_to_mds

SYNTHETIC_MIN_IMAGE_BYTES = 500
MANIFEST_NAME = "manifest.json"
FORMATS = ("wds", "mds")

COLOR_RGB = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (240, 220, 30),
    "purple": (140, 50, 180), "orange": (250, 140, 20), "white": (245, 245, 245), "black": (15, 15, 15),
    "pink": (250, 150, 190), "cyan": (40, 220, 230), "brown": (130, 80, 40), "gray": (128, 128, 128),
}  # fmt: skip
SHAPE_NAMES = ["circle", "square", "triangle", "star", "cross", "ring", "diamond", "bar"]
SIZE_SCALE = {"small": 0.11, "large": 0.2}  # shape radius as a fraction of the image side
POSITION_XY = {
    "left": (0.24, 0.5),
    "right": (0.76, 0.5),
    "top": (0.5, 0.24),
    "bottom": (0.5, 0.76),
    "center": (0.5, 0.5),
}
TEXTURE_NAMES = ["plain", "striped", "dotted", "checkered", "noisy", "speckled"]
# Every description word must be one token of the tiny tokenizer (a test checks all generated text).
assert set(COLOR_RGB) <= set(vocab.COLORS) and set(SHAPE_NAMES) <= set(vocab.SHAPES)
assert set(SIZE_SCALE) <= set(vocab.SIZES) and set(POSITION_XY) <= set(vocab.POSITIONS)
assert set(TEXTURE_NAMES) <= set(vocab.TEXTURES)


@dataclass
class SyntheticConfig:
    """Sizes and seed of the generated data set (defaults: ~10-20 s on one CPU core)."""

    seed: int = 0
    num_laion: int = 4000
    num_laion_val: int = 256
    num_mmc4: int = 1000
    num_mmc4_val: int = 128
    image_size: int = 64
    laion_shard_size: int = 500  # samples per webdataset tar
    mmc4_shard_size: int = 125  # documents per webdataset tar
    mds_size_limit: int = 1 << 20  # bytes per MDS shard (several shards, so workers and ranks share them)
    jpeg_quality: int = 90
    bad_every: int = 0  # >0: every k-th sample is deliberately broken (skip-path testing); 0 = all clean

    def __post_init__(self) -> None:
        for name in ("num_laion", "num_laion_val", "num_mmc4", "num_mmc4_val", "bad_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"synthetic: {name} must be >= 0, got {getattr(self, name)}")
        for name in ("image_size", "laion_shard_size", "mmc4_shard_size", "mds_size_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"synthetic: {name} must be >= 1, got {getattr(self, name)}")


@dataclass
class ShapeSpec:
    color: str
    shape: str
    size: str
    position: str


@dataclass
class Scene:
    """What one image shows: shapes on a background colour with a texture."""

    shapes: list[ShapeSpec]
    background: str
    texture: str
    extras: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# Scenes and rendering


def random_scene(rng: np.random.Generator, max_shapes: int = 1) -> Scene:
    """Independent draws of background, texture and 1..max_shapes shapes at distinct positions."""
    colors = list(COLOR_RGB)
    background = colors[rng.integers(len(colors))]
    num_shapes = int(rng.integers(1, max_shapes + 1))
    positions = list(rng.permutation(list(POSITION_XY))[:num_shapes])
    shapes = []
    for position in positions:
        foreground = [c for c in colors if c != background]
        shapes.append(
            ShapeSpec(
                color=foreground[rng.integers(len(foreground))],
                shape=SHAPE_NAMES[rng.integers(len(SHAPE_NAMES))],
                size=list(SIZE_SCALE)[rng.integers(len(SIZE_SCALE))],
                position=str(position),
            )
        )
    return Scene(
        shapes=shapes, background=background, texture=TEXTURE_NAMES[rng.integers(len(TEXTURE_NAMES))]
    )


def _shade(rgb: np.ndarray) -> np.ndarray:
    """A contrasting shade of the same colour for texture patterns."""
    return rgb * 0.55 if rgb.mean() > 110 else rgb * 0.5 + 127


def _background(scene: Scene, rng: np.random.Generator, size: int) -> np.ndarray:
    base = np.array(COLOR_RGB[scene.background], dtype=np.float32)
    pixels = np.broadcast_to(base, (size, size, 3)).copy()  # (S, S, 3)
    ys, xs = np.mgrid[0:size, 0:size]
    period = max(4, size // int(rng.integers(5, 10)))
    shade = _shade(base)
    if scene.texture == "striped":
        coordinate = [xs, ys, xs + ys][rng.integers(3)]
        pixels[(coordinate // (period // 2)) % 2 == 1] = shade
    elif scene.texture == "checkered":
        pixels[((xs // period) + (ys // period)) % 2 == 1] = shade
    elif scene.texture == "dotted":
        radius = max(1.0, period / 4)
        dy, dx = (ys % period) - period / 2, (xs % period) - period / 2
        pixels[dy * dy + dx * dx <= radius * radius] = shade
    elif scene.texture == "noisy":
        pixels += rng.normal(0.0, 40.0, pixels.shape)
    elif scene.texture == "speckled":
        specks = rng.random((size, size)) < 0.08
        pixels[specks] = rng.integers(0, 256, (int(specks.sum()), 3))
    pixels += rng.normal(0.0, 4.0, pixels.shape)  # sensor-like grain: no image is perfectly flat
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _star(cx: float, cy: float, r: float, points: int = 5) -> list[tuple[float, float]]:
    angles = np.arange(2 * points) * np.pi / points - np.pi / 2
    radii = np.where(np.arange(2 * points) % 2 == 0, r, r * 0.45)
    return [(cx + rad * np.cos(a), cy + rad * np.sin(a)) for a, rad in zip(angles, radii)]


def _draw_shape(draw: ImageDraw.ImageDraw, spec: ShapeSpec, rng: np.random.Generator, size: int) -> None:
    fx, fy = POSITION_XY[spec.position]
    cx = (fx + rng.uniform(-0.04, 0.04)) * size
    cy = (fy + rng.uniform(-0.04, 0.04)) * size
    r = SIZE_SCALE[spec.size] * size * rng.uniform(0.9, 1.1)
    color = COLOR_RGB[spec.color]
    box = [cx - r, cy - r, cx + r, cy + r]
    if spec.shape == "circle":
        draw.ellipse(box, fill=color)
    elif spec.shape == "ring":
        draw.ellipse(box, outline=color, width=max(2, int(r / 3)))
    elif spec.shape == "square":
        draw.rectangle(box, fill=color)
    elif spec.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=color)
    elif spec.shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=color)
    elif spec.shape == "star":
        draw.polygon(_star(cx, cy, r * 1.15), fill=color)
    elif spec.shape == "cross":
        w = r / 3
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=color)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=color)
    elif spec.shape == "bar":
        draw.rectangle([cx - r * 1.2, cy - r / 3, cx + r * 1.2, cy + r / 3], fill=color)
    else:  # pragma: no cover - SHAPE_NAMES is closed
        raise ValueError(f"unknown shape {spec.shape!r}")


def render_scene(scene: Scene, rng: np.random.Generator, size: int, quality: int = 90) -> bytes:
    """The scene as JPEG bytes (size x size pixels)."""
    image = Image.fromarray(_background(scene, rng, size), mode="RGB")
    draw = ImageDraw.Draw(image)
    for spec in scene.shapes:
        _draw_shape(draw, spec, rng, size)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# Text


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _shape_phrase(spec: ShapeSpec, rng: np.random.Generator, with_size: bool | None = None) -> str:
    """E.g. 'a small red circle at the left' (size mentioned at random unless fixed)."""
    if with_size is None:
        with_size = bool(rng.random() < 0.6)
    words = ([spec.size] if with_size else []) + [spec.color, spec.shape]
    return f"{_article(words[0])} {' '.join(words)} at the {spec.position}"


def _background_phrase(scene: Scene) -> str:
    return f"{_article(scene.texture)} {scene.texture} {scene.background} background"


def laion_caption(scene: Scene, rng: np.random.Generator) -> str:
    """One caption describing every shape and the background."""
    shapes = " and ".join(_shape_phrase(spec, rng) for spec in scene.shapes)
    background = _background_phrase(scene)
    templates = [
        f"{shapes} on {background}",
        f"a photo of {shapes} on {background} .",
        f"this picture shows {shapes} , on {background}",
        f"{shapes} . the background is {scene.texture} and {scene.background}",
    ]
    return templates[rng.integers(len(templates))]


FILLER_SENTENCES = [
    "we look at some shapes today .",
    "this is a story about colors .",
    "here is some more text about shapes .",
    "look at these shapes !",
    "then we see more colors .",
    "this document has some words about shapes and colors .",
]


def _image_sentences(scene: Scene, rng: np.random.Generator) -> list[str]:
    """The sentence the image is matched to, then (sometimes) one more about its background."""
    spec = scene.shapes[0]
    lead = ["here we see", "this image shows", "the next picture shows", "we see"][rng.integers(4)]
    sentences = [f"{lead} {_shape_phrase(spec, rng)} ."]
    if rng.random() < 0.6:
        second = [
            f"it sits on {_background_phrase(scene)} .",
            f"the background is {scene.texture} and {scene.background} .",
            f"the {spec.shape} is {spec.color} .",
        ]
        sentences.append(second[rng.integers(len(second))])
    return sentences


# ----------------------------------------------------------------------------------------------------------------
# Samples


def _rng(seed: int, dataset: str, split: str, index: int) -> np.random.Generator:
    """Per-sample generator: a sample does not change when counts of other samples change."""
    stream = {"laion": 1, "mmc4": 2}[dataset] * 10 + {"train": 1, "val": 2}[split]
    return np.random.default_rng(np.random.SeedSequence([seed, stream, index]))


def sample_key(split: str, index: int) -> str:
    """Unique across splits, dot-free (webdataset splits file names at the first dot)."""
    return f"{split}-{index:07d}"


def _is_bad(cfg: SyntheticConfig, index: int) -> int | None:
    """Which breakage (0, 1, 2) sample `index` gets when cfg.bad_every > 0, else None."""
    if cfg.bad_every and (index + 1) % cfg.bad_every == 0:
        return (index // cfg.bad_every) % 3
    return None


def make_laion_sample(cfg: SyntheticConfig, split: str, index: int) -> dict:
    """{'key', 'jpg' (bytes), 'txt' (str), 'json' (dict)}: one img2dataset-style pair."""
    rng = _rng(cfg.seed, "laion", split, index)
    scene = random_scene(rng, max_shapes=2)
    jpg = render_scene(scene, rng, cfg.image_size, cfg.jpeg_quality)
    caption = laion_caption(scene, rng)
    bad = _is_bad(cfg, index)
    if bad == 0:
        jpg = jpg[: len(jpg) // 2]  # truncated JPEG -> corrupt_image
    elif bad == 1:
        caption = " <image> "  # only a literal special token -> empty_caption after cleaning
    elif bad == 2:
        jpg = b""  # -> missing_image
    key = sample_key(split, index)
    meta = {"key": key, "caption": caption, "width": cfg.image_size, "height": cfg.image_size}
    return {"key": key, "jpg": jpg, "txt": caption, "json": meta}


def make_mmc4_document(cfg: SyntheticConfig, split: str, index: int) -> dict:
    """{'key', 'doc'}: an MMC4-style document with 1-6 base64 images and a similarity matrix."""
    rng = _rng(cfg.seed, "mmc4", split, index)
    num_images = int(rng.choice(np.arange(1, 7), p=[0.1, 0.2, 0.25, 0.2, 0.15, 0.1]))
    sentences: list[str] = []
    if rng.random() < 0.5:
        sentences.append(f"this page has {vocab.NUMBERS[num_images - 1]} shapes .")
    images, first_sentence, described = [], [], []  # per image: jpeg, matched sentence, all its sentences
    for _ in range(num_images):
        scene = random_scene(rng, max_shapes=1)
        images.append(render_scene(scene, rng, cfg.image_size, cfg.jpeg_quality))
        own = _image_sentences(scene, rng)
        first_sentence.append(len(sentences))
        described.append(list(range(len(sentences), len(sentences) + len(own))))
        sentences.extend(own)
        if rng.random() < 0.3:
            sentences.append(FILLER_SENTENCES[rng.integers(len(FILLER_SENTENCES))])

    # Similarity: the image's first sentence ~0.29-0.35, its other sentences ~0.25-0.29, the rest ~0.12-0.22.
    sim = rng.uniform(0.12, 0.22, (num_images, len(sentences)))  # (images, sentences)
    for i in range(num_images):
        for j in described[i][1:]:
            sim[i, j] = rng.uniform(0.25, 0.29)
        sim[i, first_sentence[i]] = rng.uniform(0.29, 0.35)
    sim = np.round(sim, 4)

    order = rng.permutation(num_images)  # image_info order is not the text order (as in real MMC4)
    image_info = []
    for slot, i in enumerate(order):
        image_info.append(
            {
                "image_name": f"{sample_key(split, index)}-{slot}.jpg",
                "raw_url": f"synthetic://{split}/{index}/{slot}",
                "matched_text_index": int(np.argmax(sim[i])),
                "matched_sim": float(sim[i].max()),
                "image_base64": base64.b64encode(images[i]).decode("ascii"),
            }
        )
    doc = {"text_list": sentences, "image_info": image_info, "similarity_matrix": sim[order].tolist()}
    bad = _is_bad(cfg, index)
    if bad == 0:
        for info in doc["image_info"]:
            info["image_base64"] = "not*valid*base64!"  # -> bad_base64 (webdataset) / missing_image (MDS)
    elif bad == 1:
        doc["similarity_matrix"] = [row + [0.1] for row in doc["similarity_matrix"]]  # one column too many
    elif bad == 2:
        del doc["text_list"]  # -> malformed_json
    return {"key": sample_key(split, index), "doc": doc}


# ----------------------------------------------------------------------------------------------------------------
# Writers


def _write_wds(folder: Path, split: str, samples, shard_size: int, encode) -> list[str]:
    """Write samples into split-{i:06d}.tar shards; returns the file names."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    names, writer = [], None
    for count, sample in enumerate(samples):
        if count % shard_size == 0:
            if writer is not None:
                writer.close()
            names.append(f"{split}-{len(names):06d}.tar")
            writer = wds.TarWriter(
                str(folder / names[-1]), encoder=False, mtime=0.0, user="", group="", mode=0o644
            )
        writer.write(encode(sample))
    if writer is not None:
        writer.close()
    return names


def _write_mds(folder: Path, samples, columns: dict, size_limit: int, encode) -> int:
    from streaming import MDSWriter

    count = 0
    with MDSWriter(out=str(folder), columns=columns, compression=None, size_limit=size_limit) as writer:
        for sample in samples:
            writer.write(encode(sample))
            count += 1
    return count


def _laion_wds(sample: dict) -> dict:
    return {
        "__key__": sample["key"],
        "jpg": sample["jpg"],
        "txt": sample["txt"].encode("utf-8"),
        "json": json.dumps(sample["json"], sort_keys=True).encode("utf-8"),
    }


def _mmc4_wds(sample: dict) -> dict:
    return {"__key__": sample["key"], "json": json.dumps(sample["doc"]).encode("utf-8")}


def _brace(folder: str, split: str, count: int) -> str:
    last = max(count - 1, 0)
    return f"{folder}/{split}-{{000000..{last:06d}}}.tar" if count > 1 else f"{folder}/{split}-000000.tar"


def write_synthetic_dataset(out_dir: str | Path, cfg: SyntheticConfig | None = None, formats=FORMATS) -> dict:
    """Generate the data set under out_dir (see the module docstring) and return the manifest.

    Written to a temporary sibling folder first and moved into place at the end, so an interrupted run never
    leaves a folder that looks complete. Refuses a non-empty out_dir.
    """
    cfg = cfg or SyntheticConfig()
    formats = tuple(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"synthetic: formats must be a non-empty subset of {FORMATS}, got {formats}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"synthetic: output folder {out_dir} exists and is not empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        manifest = _write_all(staging, cfg, formats)
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _write_all(root: Path, cfg: SyntheticConfig, formats: tuple[str, ...]) -> dict:
    counts = {
        "laion": {"train": cfg.num_laion, "val": cfg.num_laion_val},
        "mmc4": {"train": cfg.num_mmc4, "val": cfg.num_mmc4_val},
    }
    manifest: dict = {
        "generator": "flamingo_composer.shards.synthetic",
        "seed": cfg.seed,
        "config": asdict(cfg),
        "counts": counts,
        "recommended": {"mmc4.min_image_bytes": SYNTHETIC_MIN_IMAGE_BYTES},
        "formats": list(formats),
    }
    makers = {"laion": make_laion_sample, "mmc4": make_mmc4_document}
    for dataset in ("laion", "mmc4"):
        for split in ("train", "val"):
            samples = [makers[dataset](cfg, split, i) for i in range(counts[dataset][split])]
            if "wds" in formats:
                folder = f"wds/{dataset}"
                shard_size = cfg.laion_shard_size if dataset == "laion" else cfg.mmc4_shard_size
                encode = _laion_wds if dataset == "laion" else _mmc4_wds
                names = _write_wds(root / folder, split, samples, shard_size, encode)
                entry = manifest.setdefault("wds", {}).setdefault(dataset, {})
                entry[split] = [f"{folder}/{name}" for name in names]
                entry[f"{split}_pattern"] = _brace(folder, split, len(names))
            if "mds" in formats:
                folder = f"mds/{dataset}/{split}"
                if dataset == "laion":
                    columns, encode = LAION_MDS_COLUMNS, (lambda s: {k: s[k] for k in ("key", "jpg", "txt")})
                else:
                    columns, encode = MMC4_MDS_COLUMNS, (lambda s: mmc4_doc_to_mds(s["doc"], s["key"]))
                _write_mds(root / folder, samples, columns, cfg.mds_size_limit, encode)
                manifest.setdefault("mds", {}).setdefault(dataset, {})[split] = folder
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest
