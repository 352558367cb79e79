"""Face-parsing data: the CelebAMask-HQ mini layout, the original CelebAMask-HQ layout, an embedded
procedural generator, and the SPEC §3 augmentation.

Every dataset yields `(image, mask)`: a float32 3×S×S image normalised with ImageNet statistics
and an int64 S×S mask of class ids 0..18 (SPEC §3 order, `CLASS_NAMES`). Bad input raises
`DataError` naming the file.

Augmentation is written for batches (`augment_batch`), so the same code serves the per-sample CPU
loader here and the batched device pipeline (`msf.pipeline`); a sample's random parameters are a
hash of (seed, epoch, index) alone (`sample_params_for`), so its augmentation does not depend on
the pipeline, the loader workers, the process or where a run was resumed.
"""
from __future__ import annotations

import functools
import inspect
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

CLASS_NAMES = (
    "background", "skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear",
    "mouth", "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth",
)
NUM_CLASSES = len(CLASS_NAMES)
# A horizontal flip turns a left part into a right one: ids 4↔5, 6↔7, 8↔9.
FLIP_ID_MAP = torch.arange(NUM_CLASSES)
for _left, _right in ((4, 5), (6, 7), (8, 9)):
    FLIP_ID_MAP[_left], FLIP_ID_MAP[_right] = _right, _left

PALETTE = np.array([
    [0, 0, 0], [204, 0, 0], [76, 153, 0], [204, 204, 0], [51, 51, 255], [204, 0, 204], [0, 255, 255],
    [255, 204, 204], [102, 51, 0], [255, 0, 0], [102, 204, 0], [255, 255, 0], [0, 0, 153], [0, 0, 204],
    [255, 51, 153], [0, 204, 204], [0, 51, 0], [255, 153, 51], [0, 204, 0]], dtype=np.uint8)

# Overlays are for people, not for the data set's tools: its palette paints skin (204,0,0) and r_ear
# (255,0,0) alike and hair, l_lip and l_eye in near blues. These are 18 of Kelly's 20 colours of
# maximum contrast (K. L. Kelly, 1965; without yellow and violet, the subset whose closest pair is
# farthest apart: CIE ΔE 19), assigned so that parts that touch (skin and everything on it, hair and
# what it frames, lips and mouth, neck and cloth) are at least ΔE 29 apart. Background is never
# painted. Mask files keep PALETTE.
OVERLAY_PALETTE = np.array([
    [0, 0, 0],                                          # background (not drawn)
    [194, 178, 128], [0, 103, 165], [132, 132, 130],    # skin (buff), nose (blue), eye_g (grey)
    [0, 136, 86], [230, 143, 172],                      # l_eye (green), r_eye (purplish pink)
    [135, 86, 146], [243, 132, 0],                      # l_brow (purple), r_brow (orange)
    [141, 182, 0], [161, 202, 241],                     # l_ear (yellow green), r_ear (light blue)
    [43, 61, 38], [190, 0, 50], [249, 147, 121],        # mouth (olive green), u_lip (red), l_lip (yellowish pink)
    [136, 45, 23], [220, 211, 0], [179, 68, 108],       # hair (reddish brown), hat (greenish yellow), ear_r
    [226, 88, 34], [246, 166, 0], [101, 69, 34],        # neck_l (reddish orange), neck (orange yellow), cloth
], dtype=np.uint8)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# The original layout's part masks, painted in this order (later parts cover earlier ones).
CELEBAMASK_PARTS = CLASS_NAMES[1:]


class DataError(ValueError):
    """A data file or folder that cannot be used; the message names it."""


# ----------------------------------------------------------------------------------------------
# Reading and writing files
# ----------------------------------------------------------------------------------------------

def read_image(path: Path, size: int | None = None) -> np.ndarray:
    """H×W×3 uint8 RGB, resized (bilinear) to size×size when `size` is given."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8).copy()
    except (OSError, UnidentifiedImageError, SyntaxError) as exc:
        raise DataError(f"{path}: unreadable image ({exc})") from exc


def _require_id_mode(path: Path, mode: str) -> None:
    if mode not in ("P", "L"):
        raise DataError(f"{path}: mask must be a palette or greyscale PNG of class ids, got mode {mode}")


def read_header(path: Path, what: str = "image") -> tuple[tuple[int, int], str]:
    """((width, height), mode) from the file's header alone: PIL's open is lazy and decodes no
    pixels, so a whole data set is checked in well under a second per thousand files."""
    try:
        with Image.open(path) as im:
            return im.size, im.mode
    except (OSError, UnidentifiedImageError, SyntaxError) as exc:
        raise DataError(f"{path}: unreadable {what} ({exc})") from exc


def read_mask(path: Path, size: int | None = None) -> np.ndarray:
    """H×W uint8 class ids from a palette or greyscale PNG, resized (nearest) when asked."""
    try:
        with Image.open(path) as im:
            _require_id_mode(path, im.mode)
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.NEAREST)
            mask = np.asarray(im, dtype=np.uint8).copy()
    except (OSError, UnidentifiedImageError, SyntaxError) as exc:
        raise DataError(f"{path}: unreadable mask ({exc})") from exc
    top = int(mask.max()) if mask.size else 0
    if top >= NUM_CLASSES:
        raise DataError(f"{path}: mask holds class id {top}, outside 0..{NUM_CLASSES - 1}")
    return mask


def resize_pair(image: np.ndarray, mask: np.ndarray, size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Resize an image (bilinear) and its mask (nearest) to size×size; no-op for None."""
    if size is None or mask.shape == (size, size):
        return image, mask
    image = np.array(Image.fromarray(image).resize((size, size), Image.BILINEAR))
    mask = np.array(Image.fromarray(mask).resize((size, size), Image.NEAREST))
    return image, mask


def write_mask(path: Path, mask: np.ndarray) -> None:
    """Save class ids as a palette PNG in the data set's own format."""
    im = Image.fromarray(mask.astype(np.uint8), mode="P")
    im.putpalette(PALETTE.flatten().tolist())
    im.save(path)


def colorize(mask: np.ndarray, palette: np.ndarray = PALETTE) -> np.ndarray:
    """H×W×3 uint8 colours of an id mask (the data set's palette unless another is given)."""
    return palette[mask]


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The image with its mask's class colours (`OVERLAY_PALETTE`) blended over it; background
    left as is."""
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colorize(mask, OVERLAY_PALETTE).astype(np.float32)
    out = np.where(mask[..., None] > 0, blended, image.astype(np.float32))
    return out.clip(0, 255).astype(np.uint8)


def with_legend(panel: np.ndarray, class_ids: list[int]) -> np.ndarray:
    """`panel` (H×W×3 uint8) with a white column on its right naming each class of `class_ids` that
    the overlay paints (background is not painted, so not listed) beside its `OVERLAY_PALETTE`
    swatch. Text and swatches scale with the panel's height (about 1/32 of it a row, 12 px at
    least), so the legend stays readable on a 1024² image; the column grows taller when the list
    needs more room than H."""
    painted = [c for c in class_ids if c != 0]
    row = max(12, panel.shape[0] // 32)
    font = ImageFont.load_default(size=max(10, round(row * 0.8)))
    pad, swatch = max(2, row // 6), row - 2 * max(2, row // 6)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = max((measure.textlength(CLASS_NAMES[c], font=font) for c in painted), default=0)
    width = int(3 * pad + swatch + text_width + 2 * pad)
    height = max(panel.shape[0], row * len(painted) + 2 * pad)
    legend = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(legend)
    for k, class_id in enumerate(painted):
        top = pad + k * row
        draw.rectangle([pad, top + pad, pad + swatch, top + pad + swatch],
                       fill=tuple(int(c) for c in OVERLAY_PALETTE[class_id]), outline="black")
        draw.text((2 * pad + swatch + pad, top + row / 2), CLASS_NAMES[class_id], fill="black", font=font, anchor="lm")
    canvas = np.full((height, panel.shape[1] + width, 3), 255, dtype=np.uint8)
    canvas[:panel.shape[0], :panel.shape[1]] = panel
    canvas[:, panel.shape[1]:] = np.asarray(legend)
    return canvas


# ----------------------------------------------------------------------------------------------
# Augmentation (SPEC §3)
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AugmentConfig:
    flip_p: float = 0.5
    rotation_deg: float = 15.0
    scale: tuple[float, float] = (0.9, 1.1)
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.1


def params_from_uniforms(u: torch.Tensor, cfg: AugmentConfig = AugmentConfig()) -> dict:
    """Augmentation parameters from n×6 uniforms in [0, 1): flip, angle (radians), scale,
    brightness, contrast and saturation factors, each a length-n float64 tensor (flip: bool)."""
    u = u.to(torch.float64)

    def between(column: int, lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * u[:, column]
    return {
        "flip": u[:, 0] < cfg.flip_p,
        "angle": between(1, -cfg.rotation_deg, cfg.rotation_deg) * (math.pi / 180),
        "scale": between(2, *cfg.scale),
        "brightness": between(3, 1 - cfg.brightness, 1 + cfg.brightness),
        "contrast": between(4, 1 - cfg.contrast, 1 + cfg.contrast),
        "saturation": between(5, 1 - cfg.saturation, 1 + cfg.saturation),
    }


def sample_augment_params(n: int, generator: torch.Generator, cfg: AugmentConfig = AugmentConfig()) -> dict:
    """Random parameters for n samples (tensors of length n, on the CPU; move them with
    `params_to` and every function here computes on the device they sit on)."""
    return params_from_uniforms(torch.rand(n, 6, generator=generator, dtype=torch.float64), cfg)


def params_to(params: dict, device: torch.device | str) -> dict:
    return {k: v.to(device) for k, v in params.items()}


def index_params(params: dict, index: torch.Tensor | slice) -> dict:
    return {k: v[index] for k, v in params.items()}


def _luminance(images: torch.Tensor) -> torch.Tensor:
    r, g, b = images.unbind(dim=1)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def color_jitter(images: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor,
                 saturation: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation factors (one per sample) on B×3×H×W images in [0, 1]."""
    def per_sample(t: torch.Tensor) -> torch.Tensor:
        return t.to(images.device, images.dtype)[:, None, None, None]
    x = (images * per_sample(brightness)).clamp(0, 1)
    mean = _luminance(x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * per_sample(contrast) + mean).clamp(0, 1)
    grey = _luminance(x)
    return ((x - grey) * per_sample(saturation) + grey).clamp(0, 1)


def affine_grid_for(params: dict, height: int, width: int, device: torch.device,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sampling grid that rotates by `angle`, zooms by `scale` and mirrors where `flip`.

    Built in pixel units so rotation stays a rotation on non-square images: an output pixel p
    (relative to the centre) reads the input at R(angle)·diag(±1, 1)·p / scale.
    """
    cos, sin = params["angle"].cos(), params["angle"].sin()
    mirror = torch.where(params["flip"], -1.0, 1.0).to(torch.float64)
    inv_scale = 1.0 / params["scale"]
    aspect = height / width  # normalised x spans width/2 pixels, y spans height/2
    theta = torch.zeros(len(cos), 2, 3, dtype=torch.float64, device=cos.device)
    theta[:, 0, 0] = cos * mirror * inv_scale
    theta[:, 0, 1] = -sin * aspect * inv_scale
    theta[:, 1, 0] = sin / aspect * mirror * inv_scale
    theta[:, 1, 1] = cos * inv_scale
    return F.affine_grid(theta.to(device, dtype), [len(cos), 1, height, width], align_corners=False)


def augment_batch(images: torch.Tensor, masks: torch.Tensor, params: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC §3 training augmentation of B×3×H×W images in [0, 1] and B×H×W id masks, jointly.

    Colour jitter, then one affine warp per sample (bilinear for the image, nearest for the mask,
    zeros = background outside), then the left/right id swap on mirrored samples.

    The mask's sample points are computed in float64: nearest sampling rounds them, and in float32
    a point within rounding of a pixel edge could land on either side depending on the device's
    arithmetic, so a GPU and a CPU would disagree on a few pixels of the same augmentation.
    """
    params = params_to(params, images.device)
    images = color_jitter(images, params["brightness"], params["contrast"], params["saturation"])
    grid = affine_grid_for(params, images.shape[-2], images.shape[-1], images.device, torch.float64)
    images = F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)
    warped = F.grid_sample(masks[:, None].double(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    masks = warped[:, 0].round().long()
    flip_map = _on_device(FLIP_ID_MAP, masks.device)
    masks = torch.where(params["flip"].to(masks.device)[:, None, None], flip_map[masks], masks)
    return images, masks


@functools.lru_cache(maxsize=None)
def _on_device(constant: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A module constant copied to `device` once: a fresh host-to-device copy per batch would make
    the host wait for the GPU (pageable memory)."""
    return constant.to(device, dtype or constant.dtype)


_MEAN = torch.tensor(IMAGENET_MEAN)[:, None, None]
_STD = torch.tensor(IMAGENET_STD)[:, None, None]


def normalize(images: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """ImageNet normalisation of C×H×W or B×C×H×W images in [0, 1], in `dtype` (default: theirs):
    computed in the images' dtype and rounded once on the way out, as `.to(dtype)` of the result
    would round it, without writing the result in the images' dtype first."""
    centred = images - _on_device(_MEAN, images.device, images.dtype)
    out = torch.empty_like(centred, dtype=dtype or images.dtype)
    return torch.div(centred, _on_device(_STD, images.device, images.dtype), out=out)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on uint64 arrays (wrapping arithmetic): a strong 64-bit mixer."""
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def sample_uniforms(seed: int, epoch: int, indices, columns: int = 6) -> np.ndarray:
    """len(indices)×columns uniforms in [0, 1), entry (i, c) a hash of (seed, epoch, indices[i], c)
    alone: counter-based, so any subset of samples is drawn in any order, in any process, the same."""
    index = np.asarray(indices, dtype=np.uint64).reshape(-1, 1)
    with np.errstate(over="ignore"):
        key = _splitmix64(_splitmix64(np.array([seed % 2**64], dtype=np.uint64)) ^ np.uint64(epoch % 2**64))
        bits = _splitmix64(_splitmix64(key ^ index) + np.arange(columns, dtype=np.uint64))
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def sample_params_for(seed: int, epoch: int, indices: list[int] | int,
                      cfg: AugmentConfig = AugmentConfig()) -> dict:
    """The augmentation parameters of samples `indices` in `epoch`, a function of (seed, epoch,
    index) alone (`sample_uniforms`), so every loader, pipeline and process draws the same ones
    for a sample; a whole epoch's take well under a millisecond."""
    indices = [indices] if isinstance(indices, int) else list(indices)
    return params_from_uniforms(torch.from_numpy(sample_uniforms(seed, epoch, indices)), cfg)


def _file_stamp(path: Path) -> list:
    try:
        st = path.stat()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror})") from exc
    return [path.name, st.st_size, st.st_mtime_ns]


class FaceParsingDataset(torch.utils.data.Dataset):
    """Shared tail of every dataset: uint8 pair → optional augmentation → normalised tensors."""

    def __init__(self, augment: bool, seed: int, augment_config: AugmentConfig = AugmentConfig()):
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.augment_config = augment_config

    def set_epoch(self, epoch: int) -> None:
        """Augmentation draws depend on (seed, epoch, index); set before each epoch."""
        self.epoch = epoch

    def load_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - abstract
        """(H×W×3 uint8 image, H×W uint8 ids) of sample `index`, before augmentation."""
        raise NotImplementedError

    def check_headers(self) -> None:
        """A pre-flight check before training or scoring starts: every file opens and the sizes
        agree, read from the file headers only (no pixel is decoded). What needs the pixels (a
        truncated file, class ids outside 0..18) is checked as each sample is read."""

    def identity(self) -> dict:  # pragma: no cover - abstract
        """What `load_pair` returns depends on, and only on, this (JSON-able): the key of the
        decoded uint8 cache (`msf.pipeline`), so a changed file or size never reads stale pixels."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_u8, mask_u8 = self.load_pair(index)
        image = torch.from_numpy(image_u8).permute(2, 0, 1)[None].float().div_(255)
        mask = torch.from_numpy(mask_u8)[None].long()
        if self.augment:
            params = sample_params_for(self.seed, self.epoch, index, self.augment_config)
            image, mask = augment_batch(image, mask, params)
        return normalize(image[0]), mask[0]


# ----------------------------------------------------------------------------------------------
# Real data layouts
# ----------------------------------------------------------------------------------------------

def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{path}: {what} folder not found")
    return path


class MiniFaceDataset(FaceParsingDataset):
    """The mini layout: `<root>/<split>/images/<id>.jpg` with `<root>/<split>/masks/<id>.png`."""

    def __init__(self, root: str | Path, split: str = "train", image_size: int | None = None,
                 augment: bool = False, seed: int = 0, limit: int | None = None):
        super().__init__(augment, seed)
        self.root = Path(root)
        self.split = split
        self.image_size = image_size
        split_dir = _require_dir(self.root / split, f"'{split}' split")
        image_dir = _require_dir(split_dir / "images", "images")
        mask_dir = _require_dir(split_dir / "masks", "masks")
        self.images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.images:
            raise DataError(f"{image_dir}: no images (.jpg/.png) in the folder")
        self.images = self.images[:limit]
        self.masks = [mask_dir / (p.stem + ".png") for p in self.images]
        for image, mask in zip(self.images, self.masks):
            if not mask.is_file():
                raise DataError(f"{image}: image has no mask (expected {mask})")

    def __len__(self) -> int:
        return len(self.images)

    def identity(self) -> dict:
        return {"layout": "mini", "root": str(self.root.resolve()), "split": self.split, "size": self.image_size,
                "files": [_file_stamp(p) for pair in zip(self.images, self.masks) for p in pair]}

    def _require_same_size(self, index: int, image_wh: tuple[int, int], mask_wh: tuple[int, int]) -> None:
        if tuple(image_wh) != tuple(mask_wh):
            raise DataError(f"{self.images[index]}: image is {image_wh[0]}×{image_wh[1]} but its mask "
                            f"{self.masks[index].name} is {mask_wh[0]}×{mask_wh[1]}")

    def check_headers(self) -> None:
        for index, (image, mask) in enumerate(zip(self.images, self.masks)):
            image_wh, _ = read_header(image, "image")
            mask_wh, mode = read_header(mask, "mask")
            _require_id_mode(mask, mode)
            self._require_same_size(index, image_wh, mask_wh)

    def load_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image = read_image(self.images[index])
        mask = read_mask(self.masks[index])
        self._require_same_size(index, image.shape[1::-1], mask.shape[::-1])
        return resize_pair(image, mask, self.image_size)


class CelebAMaskHQDataset(FaceParsingDataset):
    """The original layout: `CelebA-HQ-img/<n>.jpg` (1024²) and
    `CelebAMask-HQ-mask-anno/<folder>/<nnnnn>_<part>.png` (512² binary part masks).

    Part masks are merged into one id map in `CELEBAMASK_PARTS` order (later parts cover earlier
    ones); images are resized to the mask size. `ids` picks a subset; by default every image that
    has at least one part mask.
    """

    def __init__(self, root: str | Path, ids: list[int] | None = None, image_size: int | None = None,
                 augment: bool = False, seed: int = 0, limit: int | None = None):
        super().__init__(augment, seed)
        self.root = Path(root)
        self.image_size = image_size
        self.image_dir = _require_dir(self.root / "CelebA-HQ-img", "CelebA-HQ-img")
        anno_dir = _require_dir(self.root / "CelebAMask-HQ-mask-anno", "CelebAMask-HQ-mask-anno")
        self.parts: dict[int, dict[str, Path]] = {}
        for path in anno_dir.glob("*/*.png"):
            stem, _, part = path.stem.partition("_")
            if stem.isdigit() and part in CELEBAMASK_PARTS:
                self.parts.setdefault(int(stem), {})[part] = path
        self.ids = (sorted(self.parts) if ids is None else list(ids))[:limit]
        if not self.ids:
            raise DataError(f"{anno_dir}: no part masks named <nnnnn>_<part>.png")
        for i in self.ids:
            if i not in self.parts:
                raise DataError(f"{self.image_dir / f'{i}.jpg'}: image has no part masks in {anno_dir}")

    def __len__(self) -> int:
        return len(self.ids)

    def identity(self) -> dict:
        files = [_file_stamp(self.image_dir / f"{n}.jpg") + [_file_stamp(p) for p in sorted(self.parts[n].values())]
                 for n in self.ids]
        return {"layout": "celebamask-hq", "root": str(self.root.resolve()), "size": self.image_size, "files": files}

    def check_headers(self) -> None:
        for n in self.ids:
            read_header(self.image_dir / f"{n}.jpg", "image")
            sizes = {path: read_header(path, "part mask")[0] for path in sorted(self.parts[n].values())}
            first = next(iter(sizes.values()))
            for path, size in sizes.items():
                if size != first:
                    raise DataError(f"{path}: part mask is {size[0]}×{size[1]}, others are {first[0]}×{first[1]}")

    def load_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        n = self.ids[index]
        mask = None
        for class_id, part in enumerate(CELEBAMASK_PARTS, start=1):
            path = self.parts[n].get(part)
            if path is None:
                continue
            try:
                with Image.open(path) as im:
                    layer = np.asarray(im.convert("L")) > 127
            except (OSError, UnidentifiedImageError, SyntaxError) as exc:
                raise DataError(f"{path}: unreadable part mask ({exc})") from exc
            if mask is None:
                mask = np.zeros(layer.shape, dtype=np.uint8)
            elif layer.shape != mask.shape:
                raise DataError(f"{path}: part mask is {layer.shape[1]}×{layer.shape[0]}, others are "
                                f"{mask.shape[1]}×{mask.shape[0]}")
            mask[layer] = class_id
        if mask is None:
            raise DataError(f"{self.image_dir / f'{n}.jpg'}: image has no readable part masks")
        image = read_image(self.image_dir / f"{n}.jpg", mask.shape[0])  # images are resized to mask size
        return resize_pair(image, mask, self.image_size)


# ----------------------------------------------------------------------------------------------
# The embedded synthetic default
# ----------------------------------------------------------------------------------------------

def render_synthetic_face(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One procedural face-like image (size×size×3 uint8) and its 19-class id mask.

    Parts are ellipses and bands in face-local coordinates (face half-width 1) under a random
    pose (centre, size, in-plane rotation), painted in back-to-front order. "Left" parts
    (l_eye, l_brow, l_ear) sit on the image's right, as the person's left does on a photo.
    Colours are random per part with shading and noise, so colour alone does not give the class.
    """
    v, u = (np.mgrid[0:size, 0:size] + 0.5) / size * 2 - 1
    cx, cy = rng.uniform(-0.12, 0.12), rng.uniform(-0.15, 0.05)
    half_width = rng.uniform(0.25, 0.36)
    angle = rng.uniform(-0.35, 0.35)
    du, dv = u - cx, v - cy
    x = (np.cos(angle) * du + np.sin(angle) * dv) / half_width
    y = (-np.sin(angle) * du + np.cos(angle) * dv) / half_width

    def ellipse(x0: float, y0: float, rx: float, ry: float) -> np.ndarray:
        return ((x - x0) / rx) ** 2 + ((y - y0) / ry) ** 2 <= 1.0

    mask = np.zeros((size, size), dtype=np.uint8)

    def paint(region: np.ndarray, class_id: int) -> None:
        mask[region] = class_id

    paint(ellipse(0, 3.3, rng.uniform(2.2, 3.0), 1.7), 18)                       # cloth (shoulders)
    paint((np.abs(x) < rng.uniform(0.4, 0.5)) & (y > 0.7) & (y < 2.1), 17)      # neck
    if rng.random() < 0.15:                                                       # necklace
        ring = np.hypot(x / 0.5, (y - 1.25) / 0.55)
        paint((np.abs(ring - 1) < 0.12) & (y > 1.3), 16)
    hair_length = rng.uniform(1.3, 2.2)
    if rng.random() < 0.9:
        paint(ellipse(0, -0.2 + (hair_length - 1.3) / 2, 1.22, hair_length), 13)  # hair behind the head
    ear_y = rng.uniform(-0.05, 0.15)
    paint(ellipse(1.0, ear_y, 0.17, 0.3), 8)                                    # l_ear (image right)
    paint(ellipse(-1.0, ear_y, 0.17, 0.3), 9)                                   # r_ear
    if rng.random() < 0.2:                                                        # earrings
        paint(ellipse(1.03, ear_y + 0.38, 0.07, 0.07), 15)
        paint(ellipse(-1.03, ear_y + 0.38, 0.07, 0.07), 15)
    paint(ellipse(0, 0, 1.0, 1.3), 1)                                            # skin
    fringe = -0.75 + 0.12 * np.sin(x * rng.uniform(3, 8) + rng.uniform(0, 6)) + rng.uniform(-0.1, 0.15)
    paint(ellipse(0, 0, 1.02, 1.32) & (y < fringe), 13)                           # hair over the forehead
    if rng.random() < 0.15:
        paint(ellipse(0, -1.05, 1.35, 0.75) & (y < -0.55), 14)                    # hat
    eye_x, eye_y = rng.uniform(0.32, 0.42), rng.uniform(-0.25, -0.1)
    if rng.random() < 0.2:                                                        # glasses
        paint(ellipse(eye_x, eye_y, 0.27, 0.19) | ellipse(-eye_x, eye_y, 0.27, 0.19)
              | ((np.abs(x) < eye_x) & (np.abs(y - eye_y + 0.05) < 0.03)), 3)
    brow_y = eye_y - rng.uniform(0.16, 0.24)
    paint(ellipse(eye_x, brow_y, 0.22, 0.05), 6)                                # l_brow
    paint(ellipse(-eye_x, brow_y, 0.22, 0.05), 7)                               # r_brow
    eye_h = rng.uniform(0.05, 0.09)
    paint(ellipse(eye_x, eye_y, 0.14, eye_h), 4)                                # l_eye
    paint(ellipse(-eye_x, eye_y, 0.14, eye_h), 5)                               # r_eye
    paint(ellipse(0, 0.18, rng.uniform(0.1, 0.15), 0.22), 2)                    # nose
    mouth_y, mouth_w = rng.uniform(0.55, 0.7), rng.uniform(0.22, 0.34)
    paint(ellipse(0, mouth_y - 0.04, mouth_w, 0.07), 11)                        # upper lip
    paint(ellipse(0, mouth_y + 0.05, mouth_w * 0.92, 0.08), 12)                 # lower lip
    if rng.random() < 0.5:
        paint(ellipse(0, mouth_y, mouth_w * 0.8, rng.uniform(0.015, 0.04)), 10)  # open mouth

    colours = rng.uniform(0, 255, size=(NUM_CLASSES, 3))
    skin = np.array([rng.uniform(150, 240), rng.uniform(100, 190), rng.uniform(80, 160)])
    colours[[1, 2, 8, 9, 17]] = skin + rng.normal(0, 8, size=(5, 3))
    colours[[4, 5]] = rng.uniform(20, 90, size=3)
    colours[[6, 7]] = rng.uniform(10, 80, size=3)
    colours[13] = rng.uniform(10, 200, size=3)
    colours[[11, 12]] = skin * np.array([0.9, 0.55, 0.6])
    colours[10] = rng.uniform(30, 80, size=3)
    shading = 1 + 0.25 * (np.cos(rng.uniform(0, 2 * np.pi)) * u + np.sin(rng.uniform(0, 2 * np.pi)) * v)
    image = colours[mask] * shading[..., None] + rng.normal(0, 12, size=(size, size, 3))
    return image.clip(0, 255).astype(np.uint8), mask


class SyntheticFaces(FaceParsingDataset):
    """`num_images` procedural faces, image i drawn from seed (seed, i): no files, no download."""

    def __init__(self, num_images: int = 256, image_size: int = 128, seed: int = 0, augment: bool = False):
        super().__init__(augment, seed)
        if num_images < 1 or image_size < 1:
            raise ValueError(f"num_images and image_size must be positive, got {num_images}, {image_size}")
        self.num_images = num_images
        self.image_size = image_size

    def __len__(self) -> int:
        return self.num_images

    def identity(self) -> dict:
        renderer = zlib.crc32(inspect.getsource(render_synthetic_face).encode())
        return {"layout": "synthetic", "seed": self.seed, "images": self.num_images, "size": self.image_size,
                "renderer": renderer}

    def load_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return render_synthetic_face(np.random.default_rng([self.seed, index]), self.image_size)


def open_dataset(root: str | Path | None, split: str, image_size: int | None, augment: bool = False,
                 seed: int = 0, synthetic_images: int = 256, limit: int | None = None) -> FaceParsingDataset:
    """The dataset at `root` in whichever layout it has, or the synthetic faces when root is None;
    `limit`: only its first `limit` samples (files in name order), for a quick run on a few images.

    Synthetic splits differ by seed (train: seed, val: seed + 1_000_003) so they never share faces.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    if root is None:
        split_seed = seed if split == "train" else seed + 1_000_003
        return SyntheticFaces(min(synthetic_images, limit or synthetic_images), image_size or 128, split_seed, augment)
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: data folder not found")
    if (root / split / "images").is_dir() or (root / "train" / "images").is_dir():
        return MiniFaceDataset(root, split, image_size, augment, seed, limit)
    if (root / "CelebA-HQ-img").is_dir():
        return CelebAMaskHQDataset(root, image_size=image_size, augment=augment, seed=seed, limit=limit)
    raise DataError(f"{root}: not a data set folder (expected <split>/images + <split>/masks, "
                    "or CelebA-HQ-img + CelebAMask-HQ-mask-anno)")
