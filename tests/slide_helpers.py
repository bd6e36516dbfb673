"""Synthetic whole-slide images and a colour ViT, for tests/test_slides.py and benchmarks/slide_bench.py.

Slides are pyramidal TIFFs written with tifffile the way scanners write them and OpenSlide reads
them (its "generic-tiff" format): every level its own page (reduced levels marked
``subfiletype=1``; OpenSlide ignores SubIFDs), 256 px JPEG tiles (YCbCr, 2x2 subsampling) and the
resolution in pixels per centimetre. The content is a *layout*: a grid of class ids (-1 = glass)
whose cells are 150 px tiles at the Kather resolution (0.495 µm/px), resized as a whole to the
slide's level-0 µm/px, so cell (r, c) covers level-0 pixels ``[c, c + 1) * 150 * 0.495 / mpp``.

:func:`colour_vit` builds a real ``ViTForImageClassification`` (saved and loaded like a trained
one) whose prediction is the class of the nearest class centroid of the tile's colours:
patch embeddings carry the patch's mean colour, a first layer's MLP adds random nonlinear features
of it, a second layer of uniform attention averages them over the patches into the CLS token (a
description of the tile's colour distribution), and the classifier is the nearest-centroid rule
(linear in the features). Tiles it gets
right with a margin are what the slides are made of, so "a model that classifies the source tiles
correctly" holds by construction, for real Kather tiles as for synthetic ones.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

KATHER_MPP = 0.495
TILE = 150
REAL_TILES = Path(__file__).resolve().parents[2] / "shared" / "data" / "kather2016_6class"
GLASS = 245
JPEG = {"compression": "jpeg", "compressionargs": {"level": 90}, "subsampling": (2, 2), "photometric": "rgb"}


# The slide of the README picture: a piece of tissue on glass, classes in regions (. = glass;
# T Tumor, S Stroma, C Complex, L Lympho, D Debris, M Mucosa: the label order of the package).
DEMO_LAYOUT_TEXT = """
..............
....TTTSS.....
..TTTTSSSSC...
.LLTTTSSSCCC..
.LLLTTDDSCCMM.
..LLDDDDCCMMM.
..LLLDDSSMMMM.
...LL.SSSMMM..
.......SS.....
..............
"""


def parse_layout(text: str, codes: str = "TSCLDM") -> np.ndarray:
    """A layout grid from rows of characters: ``codes[k]`` is class k, anything else glass (-1)."""
    rows = [line for line in text.strip().splitlines() if line]
    return np.array([[codes.index(ch) if ch in codes else -1 for ch in row] for row in rows])


def glass(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Empty glass: near-white with a little sensor noise."""
    return np.clip(rng.normal(GLASS, 3, (height, width, 3)), 0, 255).astype(np.uint8)


def layout_image(layout: np.ndarray, tiles: dict[int, list[np.ndarray]], seed: int = 0) -> np.ndarray:
    """The layout at 0.495 µm/px: cell (r, c) is the next tile of its class (cycling), glass for -1."""
    rng = np.random.default_rng(seed)
    used = {k: 0 for k in tiles}
    image = glass(layout.shape[0] * TILE, layout.shape[1] * TILE, rng)
    for (r, c), k in np.ndenumerate(layout):
        if k >= 0:
            image[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE] = tiles[k][used[k] % len(tiles[k])]
            used[k] += 1
    return image


def at_mpp(image: np.ndarray, mpp: float) -> np.ndarray:
    """``image`` (0.495 µm/px) resampled to ``mpp`` µm/px (the layout's size must come out whole)."""
    factor = KATHER_MPP / mpp
    size = (round(image.shape[1] * factor), round(image.shape[0] * factor))
    return np.asarray(Image.fromarray(image).resize(size, Image.LANCZOS))


def write_pyramid(path: str | Path, level0: np.ndarray, mpp: float | None, levels: int = 3,
                  codec: str = "jpeg") -> Path:
    """Pyramidal TIFF of ``level0`` (HxWx3 uint8), each level half the previous one; JPEG tiles, or with
    ``codec="zlib"`` deflate ones (tifffile needs no imagecodecs for those)."""
    import tifffile

    images = [level0]
    for _ in range(levels - 1):
        images.append(np.asarray(Image.fromarray(images[-1]).reduce(2)))
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for i, image in enumerate(images):
            extra = {}
            if mpp is not None:
                extra = {"resolution": (1e4 / (mpp * 2**i),) * 2, "resolutionunit": "CENTIMETER"}
            compression = JPEG if codec == "jpeg" else {"compression": codec, "photometric": "rgb"}
            tif.write(image, tile=(256, 256), subfiletype=1 if i else 0, metadata=None, **compression, **extra)
    return Path(path)


def write_tiled_pyramid(path: str | Path, width: int, height: int, mpp: float, downsamples: Sequence[int],
                        draw: Callable[[int, int, int, int], np.ndarray]) -> Path:
    """Pyramidal JPEG TIFF too big for memory: ``draw(downsample, y0, x0, size)`` returns one
    ``size`` x ``size`` tile of the level of that downsample; identical tiles are encoded once."""
    import imagecodecs
    import tifffile

    cache: dict[bytes, bytes] = {}

    def encode(tile: np.ndarray) -> bytes:
        key = tile.tobytes()[::97]  # the draw functions make few distinct tiles; sample bytes as the key
        if key not in cache:
            cache[key] = imagecodecs.jpeg_encode(tile, level=90, colorspace="RGB", outcolorspace="YCBCR",
                                                 subsampling=(2, 2))
        return cache[key]

    def tiles(ds: int, w: int, h: int) -> Iterator[bytes]:
        for y in range(0, h, 256):
            for x in range(0, w, 256):
                yield encode(draw(ds, y, x, 256))

    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for i, ds in enumerate(downsamples):
            w, h = -(-width // ds), -(-height // ds)
            tif.write(tiles(ds, w, h), shape=(h, w, 3), dtype=np.uint8, tile=(256, 256),
                      subfiletype=1 if i else 0, metadata=None, resolution=(1e4 / (mpp * ds),) * 2,
                      resolutionunit="CENTIMETER", **JPEG)
    return Path(path)


def corrupt_tile(path: str | Path, page: int, index: int) -> None:
    """Overwrite the middle of tile ``index`` of ``page`` with zeros (a JPEG that fails to decode)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[page].dataoffsets[index], tif.pages[page].databytecounts[index]
    with open(path, "r+b") as handle:
        handle.seek(offset + count // 4)
        handle.write(b"\x00" * (count // 2))


# --- the colour ViT -----------------------------------------------------------------------
_C = 20.0  # constant token entries that make LayerNorm nearly linear in the colour entries


def _colour_encoder(label_names: Sequence[str], image_size: int = 64, patch: int = 8, seed: int = 0):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       image_size=image_size, patch_size=patch, id2label=dict(enumerate(label_names)),
                       label2id={n: i for i, n in enumerate(label_names)}, layer_norm_eps=1e-6)
    model = ViTForImageClassification(config).eval()
    gen = torch.Generator().manual_seed(seed)
    ln_scale = _C * np.sqrt(2 / 32)  # what LayerNorm divides a token by: undone where it matters
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for norm in (model.vit.layernorm, *(m for layer in model.vit.layers
                                            for m in (layer.layernorm_before, layer.layernorm_after))):
            norm.weight.fill_(1.0)
        emb = model.vit.embeddings
        for ch in range(3):  # token entries 0-2: the patch's mean normalised colour
            emb.patch_embeddings.projection.weight[ch, ch] = 1.0 / (patch * patch)
        emb.patch_embeddings.projection.bias[3], emb.patch_embeddings.projection.bias[4] = _C, -_C
        emb.cls_token[0, 0, 3], emb.cls_token[0, 0, 4] = _C, -_C
        # layer 0 (its attention adds nothing): the MLP writes 27 random ridge features of the
        # patch colour into entries 5-31, so the mean over patches describes the colour distribution
        mlp = model.vit.layers[0].mlp
        mlp.fc1.weight[:, :3] = torch.randn(64, 3, generator=gen) * 3 * ln_scale
        mlp.fc1.bias.copy_((torch.rand(64, generator=gen) * 2 - 1) * 3)
        mlp.fc2.weight[5:] = torch.randn(27, 64, generator=gen) * 0.03
        # layer 1: q = k = 0, uniform attention: CLS gains the mean over tokens of entries 0-2, 5-31
        attention = model.vit.layers[1].attention
        for i in (*range(3), *range(5, 32)):
            attention.v_proj.weight[i, i] = 1.0
            attention.o_proj.weight[i, i] = ln_scale
    return model


@torch.no_grad()
def _features(model, processor, tiles: np.ndarray) -> torch.Tensor:
    from hf_tissue_vit.transforms import TileTransform

    pixel_values = TileTransform.from_processor(processor)(torch.from_numpy(tiles))
    return model.vit(pixel_values=pixel_values).last_hidden_state[:, 0]  # what the classifier sees


def colour_vit(tiles_by_class: dict[int, np.ndarray], label_names: Sequence[str],
                    mpp: float | None = KATHER_MPP):
    """(model, processor): nearest class centroid of the colour features, centroids from ``tiles_by_class``
    ([N, S, S, 3] uint8 candidates per class id); ``config.mpp`` is set to ``mpp``."""
    from hf_tissue_vit.transforms import make_image_processor

    model = _colour_encoder(label_names)
    processor = make_image_processor(model.config.image_size)
    centroids = torch.stack([_features(model, processor, tiles_by_class[k]).mean(dim=0)
                             for k in range(len(label_names))])
    centre = centroids.mean(dim=0)
    alpha = 4000.0
    with torch.no_grad():  # -alpha |f - c_k|^2 less the terms common to all classes, centred (bf16-safe)
        model.classifier.weight.copy_(2 * alpha * (centroids - centre))
        model.classifier.bias.copy_(-alpha * ((centroids**2).sum(dim=1) - (centre**2).sum()))
    if mpp is not None:
        model.config.mpp = float(mpp)
    return model, processor


def slide_like(tiles: np.ndarray) -> np.ndarray:
    """What reading a tile back from a 0.25 µm/px JPEG slide does to it: upsample, JPEG, downsample."""
    out = []
    for tile in tiles:
        image = Image.fromarray(tile).resize((297, 297), Image.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        out.append(np.asarray(Image.open(buffer).convert("RGB").resize(tile.shape[:2][::-1], Image.BILINEAR)))
    return np.stack(out)


def select_tiles(
    model, processor, tiles_by_class: dict[int, np.ndarray], min_prob: float = 0.9
) -> dict[int, np.ndarray]:
    """The candidates the model classifies right (fp32 and bf16, as given and :func:`slide_like`)
    with at least ``min_prob``: the tiles a test slide is made of."""
    from hf_tissue_vit.predict import TilePredictor

    keep = {k: np.ones(len(t), bool) for k, t in tiles_by_class.items()}
    for bf16 in (False, True):
        predictor = TilePredictor(model, processor, batch_size=256, bf16=bf16, num_workers=0)
        for k, tiles in tiles_by_class.items():
            for version in (tiles, slide_like(tiles)):
                probs = predictor.predict_tiles(torch.from_numpy(version)).numpy()
                keep[k] &= probs[:, k] >= min_prob
    return {k: tiles_by_class[k][keep[k]] for k in tiles_by_class}


def save_model(model, processor, path: str | Path) -> Path:
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return Path(path)


def candidate_tiles(per_class: int = 80) -> dict[int, np.ndarray]:
    """Candidate source tiles per class id: the first real Kather tiles of each class folder when
    ../shared has them, synthetic ones (tests/conftest.py's styles) otherwise."""
    from hf_tissue_vit.constants import CLASS_NAMES, KATHER_FOLDERS

    if REAL_TILES.is_dir():
        out = {}
        for k, folder in enumerate(list(KATHER_FOLDERS)[:6]):
            paths = sorted(p for p in (REAL_TILES / folder).iterdir() if p.suffix.lower() in (".png", ".tif"))
            out[k] = np.stack([np.asarray(Image.open(p).convert("RGB"))[:TILE, :TILE] for p in paths[:per_class]])
        return out
    from conftest import tile_pixels

    rng = np.random.default_rng(0)
    return {k: np.stack([tile_pixels(name, TILE, rng) for _ in range(6)]) for k, name in enumerate(CLASS_NAMES)}


def write_demo(folder: str | Path, model, processor, tiles: dict[int, np.ndarray]) -> Path:
    """The README example: ``folder/outputs/scratch`` (the colour model) and
    ``folder/slides/synthetic_40x.tif`` (:data:`DEMO_LAYOUT_TEXT` at 0.25 µm/px)."""
    folder = Path(folder)
    (folder / "slides").mkdir(parents=True, exist_ok=True)
    save_model(model, processor, folder / "outputs" / "scratch")
    image = at_mpp(layout_image(parse_layout(DEMO_LAYOUT_TEXT), tiles), 0.25)
    write_pyramid(folder / "slides" / "synthetic_40x.tif", image, 0.25)
    return folder


if __name__ == "__main__":  # python tests/slide_helpers.py DIR: the README picture's model and slide
    import sys

    from hf_tissue_vit.constants import CLASS_NAMES

    candidates = candidate_tiles()
    colour_model, colour_processor = colour_vit(candidates, CLASS_NAMES)
    print(write_demo(sys.argv[1], colour_model, colour_processor, select_tiles(colour_model, colour_processor,
                                                                                  candidates)))
