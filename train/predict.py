"""`msf predict`: id masks and colour overlays for images and folders of images.

    msf predict IMAGE_OR_DIR... --out OUT [--recursive] [--overwrite] [--engine auto|torch|onnxruntime]

For each image: `<stem>.png`, the id mask as a palette PNG in the data set's own format, and
`<stem>_overlay.png`, the image beside its parts painted in a readable palette with a legend.
An image named on the command line lands in OUT itself (two inputs of one stem get `-2`, `-3`, ...
in command-line order); an image found in a folder lands at its path relative to that folder, so
a tree is mirrored. In that order:

1. every input is found and opened (header only, no pixels decoded): one that is not an image
   stops the run before anything is written;
2. no output may replace an input (a `.png` input inside OUT), else nothing is written;
3. an image whose two outputs exist is skipped unless `--overwrite`;
4. the rest are parsed `batch_size` at a time by a `msf.FaceParser`; an image whose pixels turn
   out unreadable (a truncated file) is reported and the others go on.

It ends with one line: images written, skipped and failed (named), and the seconds it took.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from msf.data import IMAGE_SUFFIXES, DataError, overlay, read_header, read_image, with_legend, write_mask
from msf.parser import FaceParser


@dataclass(frozen=True)
class Job:
    image: Path
    mask: Path      # <stem>.png
    overlay: Path   # <stem>_overlay.png


@dataclass
class Outcome:
    written: list[Job] = field(default_factory=list)
    skipped: list[Job] = field(default_factory=list)
    failed: list[tuple[Job, str]] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self, out_dir: Path) -> str:
        parts = [f"wrote the masks and overlays of {len(self.written)} image{'s' * (len(self.written) != 1)} "
                 f"to {out_dir} in {self.seconds:.1f} s"]
        if self.skipped:
            parts.append(f"skipped {len(self.skipped)} whose outputs exist (--overwrite redoes them)")
        if self.failed:
            parts.append(f"{len(self.failed)} failed: " + "; ".join(f"{job.image} ({why})" for job, why in self.failed))
        return "; ".join(parts)


def find_images(inputs: list[Path], recursive: bool) -> list[tuple[Path, Path]]:
    """(image, its output stem relative to --out) for every input: a file as itself (stem only),
    a folder's images (in name order; subfolders too with `recursive`) at their relative paths."""
    found = []
    for path in inputs:
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            images = sorted(p for p in path.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise DataError(f"{path}: no images (.jpg/.png) in the folder"
                                + ("" if recursive else "; --recursive looks in its subfolders"))
            found += [(image, image.relative_to(path).with_suffix("")) for image in images]
        elif path.is_file():
            found.append((path, Path(path.stem)))
        else:
            raise DataError(f"{path}: image not found (nothing was written)")
    return found


def check_images(paths: list[Path]) -> None:
    """Every input exists and opens as an image, from its header alone (no pixels decoded): run
    before anything is written, so a bad input in the list leaves --out as it was."""
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path}: image not found (nothing was written)")
        try:
            read_header(path, "image")
        except DataError as exc:
            raise DataError(f"{exc} (nothing was written)") from None


def plan_outputs(found: list[tuple[Path, Path]], out_dir: Path) -> list[Job]:
    """A Job per image: `<stem>.png` and `<stem>_overlay.png` under `out_dir`. Output names that
    would collide (the same stem twice, or `a.jpg` beside `a_overlay.jpg`) are renamed
    deterministically, the later input getting `<stem>-2`, `-3`, ... . Refused with a DataError:
    an `--out` that is a file, and any output that would replace one of the inputs."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--out {out_dir}: is a file; give a folder for the masks and overlays")
    taken: set[Path] = set()
    jobs = []
    for image, stem in found:
        name, n = stem.name, 1
        while {out_dir / stem.parent / f"{name}.png", out_dir / stem.parent / f"{name}_overlay.png"} & taken:
            n += 1
            name = f"{stem.name}-{n}"
        job = Job(image, out_dir / stem.parent / f"{name}.png", out_dir / stem.parent / f"{name}_overlay.png")
        taken.update((job.mask, job.overlay))
        jobs.append(job)

    def file_id(path: Path) -> tuple[int, int]:  # the same file under any name (links included)
        st = path.stat()
        return st.st_dev, st.st_ino
    inputs = {file_id(job.image): job.image for job in jobs}
    for output in sorted(taken):
        hit = inputs.get(file_id(output)) if output.exists() else None
        if hit is not None:
            raise DataError(f"{hit}: predicting into --out {out_dir} would overwrite this input with "
                            f"{output.name}; choose another --out (nothing was written)")
    return jobs


def write_outputs(job: Job, image: np.ndarray, ids: np.ndarray) -> None:
    job.mask.parent.mkdir(parents=True, exist_ok=True)
    write_mask(job.mask, ids)
    side_by_side = np.concatenate([image, overlay(image, ids)], axis=1)
    Image.fromarray(with_legend(side_by_side, np.unique(ids).tolist())).save(job.overlay)


def predict_to_folder(parser: FaceParser, jobs: list[Job], overwrite: bool = False,
                      progress: bool = True) -> Outcome:
    """Parse and write every job (`parser.batch_size` images at a time), skipping those whose
    outputs exist unless `overwrite`; an image that cannot be decoded is recorded and passed over."""
    outcome = Outcome()
    started = time.perf_counter()
    todo = []
    for job in jobs:
        if not overwrite and job.mask.is_file() and job.overlay.is_file():
            outcome.skipped.append(job)
        else:
            todo.append(job)
    with tqdm(total=len(todo), desc="predict", unit="img", disable=not progress or len(todo) < 4) as bar:
        for start in range(0, len(todo), parser.batch_size):
            batch, images = [], []
            for job in todo[start:start + parser.batch_size]:
                try:
                    images.append(read_image(job.image))
                    batch.append(job)
                except DataError as exc:
                    outcome.failed.append((job, str(exc).removeprefix(f"{job.image}: ")))
                    bar.update()
            for job, image, ids in zip(batch, images, parser.parse_arrays(images, parser.tta)):
                write_outputs(job, image, ids)
                outcome.written.append(job)
                bar.update()
    outcome.seconds = time.perf_counter() - started
    return outcome
