"""`msf` command line: train, eval, predict, export, demo.

    msf train [--data DIR] [options]          train (synthetic faces when no --data); --resume RUN_DIR
    msf eval --data DIR --checkpoint CKPT     score a checkpoint at the data's native resolution
    msf predict --checkpoint CKPT IMAGE_OR_DIR... --out DIR [--recursive] [--engine onnxruntime]
    msf export RUN_DIR/best.pt OUT.safetensors  fp16 release with its configs (--onnx OUT.onnx: an ONNX model)
    msf bench [--preset paper|smoke] ...       speed and memory, eager vs torch.compile vs triton
    msf demo                                   one forward/backward on random data

Errors in the input (missing folder, bad checkpoint, bad option) print one line and exit 2;
Ctrl-C prints one line (where the last checkpoint is) and exits 130.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

from tqdm import tqdm

from msf.backend import interpreted, require_runnable
from msf.data import NUM_CLASSES, DataError, open_dataset
from msf.model import TTA_MODES
from msf.train.checkpoint import CheckpointError, load_model, write_release
from msf.train.config import TrainConfig, add_config_arguments, config_from_args, given_fields


def cmd_train(args: argparse.Namespace) -> int:
    from msf.train.loop import train
    allowed = {name.strip().replace("-", "_") for name in (args.allow_changes or "").split(",") if name.strip()}
    unknown = sorted(allowed - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise ValueError(f"--allow-changes: {', '.join(unknown)} is not a training option")
    if allowed and not args.resume:
        raise ValueError("--allow-changes applies to --resume only")
    run_dir = train(config_from_args(args), resume=args.resume, given=given_fields(args.argv), allow_changes=allowed)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 speaks for the run
        print(f"run directory: {run_dir}")
    return 0


def _device(name: str, backend: str = "eager") -> torch.device:
    from msf.train.distributed import pick_device
    device = pick_device(name)
    require_runnable(backend, device)
    if interpreted(backend, device):
        print("note: the Triton kernels run through Triton's CPU interpreter: expect minutes, not seconds",
              file=sys.stderr, flush=True)
    return device


def _compile(model, args: argparse.Namespace, batch: int, input_size: int, device: torch.device) -> float | None:
    """With --compile: the model's forward under torch.compile, compiled now; its time on stderr."""
    if not args.compile:
        return None
    from msf.train.evaluate import compile_for_inference
    seconds = compile_for_inference(model, batch, input_size, device, args.amp)
    print(f"compiled the forward in {seconds:.1f} s (not counted in the timings below)", file=sys.stderr, flush=True)
    return seconds


def cmd_eval(args: argparse.Namespace) -> int:
    from msf.pipeline import LoaderBatches, eval_plan
    from msf.train.evaluate import evaluate
    if args.batch_size < 1 or args.num_workers < 0:
        raise ValueError(f"--batch-size must be at least 1 and --num-workers at least 0, got {args.batch_size} "
                         f"and {args.num_workers}")
    device = _device(args.device, args.backend)
    model, train_cfg = load_model(args.checkpoint, args.backend, expected_classes=NUM_CLASSES)
    model.to(device)
    input_size = args.input_size or train_cfg.get("image_size") or 512
    compile_seconds = _compile(model, args, args.batch_size, input_size, device)
    dataset = open_dataset(args.data, args.split, image_size=None, limit=args.limit)
    dataset.check_headers()
    batches = LoaderBatches(dataset, lambda epoch: eval_plan(len(dataset), args.batch_size), device,
                            args.num_workers).epoch()
    started = time.perf_counter()
    # the progress bar goes to stderr, so it shows beside --json's output on stdout
    scores = evaluate(model, batches, device, input_size, args.amp, progress=sys.stderr.isatty(), tta=args.tta)
    scores.update(classes_absent=absent_classes(scores), checkpoint=str(args.checkpoint), split=args.split,
                  input_size=input_size,
                  scored_at=list(dataset[0][1].shape), seconds=round(time.perf_counter() - started, 2))
    if compile_seconds is not None:
        scores["compile_seconds"] = round(compile_seconds, 2)
    if args.json:
        print(json.dumps(scores, indent=2))
    else:
        print(f"{args.checkpoint} on {args.data}/{args.split} ({scores['images']} images, model at {input_size}², "
              f"scored at {scores['scored_at'][0]}×{scores['scored_at'][1]}):")
        with_tta = scores.get(f"tta_{args.tta}")
        print(f"  F-score {scores['f_score']:.4f}   mIoU {scores['miou']:.4f}"
              + (f"   (tta {args.tta}: F-score {with_tta['f_score']:.4f}   mIoU {with_tta['miou']:.4f})" if with_tta else ""))
        for name, f1 in scores["per_class_f1"].items():
            print(f"  {name:>10s}  F1 {f1:.4f}" + (f"   tta {with_tta['per_class_f1'][name]:.4f}" if with_tta else ""))
        if scores["classes_absent"]:
            print(f"  not scored: {', '.join(scores['classes_absent'])} (in neither the masks nor the predictions "
                  f"of these {scores['images']} images: no F1 or IoU, and no part in any average)")
    return 0


def absent_classes(scores: dict) -> list[str]:
    """The classes `scores` has no F1 for: in no mask and no prediction (`FScoreMeter.compute`)."""
    from msf.data import CLASS_NAMES
    return [name for name in CLASS_NAMES if name not in scores["per_class_f1"]]


def cmd_predict(args: argparse.Namespace) -> int:
    from msf.parser import FaceParser
    from msf.train.predict import check_images, find_images, plan_outputs, predict_to_folder
    if args.amp == "fp16":
        raise ValueError("--amp fp16 is not offered for predict; use bf16 or off")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    engine = "torch" if args.compile and args.engine == "auto" else args.engine
    if args.compile and engine != "torch":
        raise ValueError("--compile applies to the torch engine (give --engine torch)")
    if args.backend == "triton" and engine == "onnxruntime":
        raise ValueError("--backend triton runs in the torch engine (give --engine torch or auto)")
    if args.backend == "triton":
        engine = "torch"
    # the device (and whether the backend can run there) first: building a triton model imports the
    # kernels, which read TRITON_INTERPRET once, at import
    device = _device(args.device, args.backend) if engine != "onnxruntime" else torch.device("cpu")
    parser = FaceParser.from_pretrained(args.checkpoint, engine=engine, device=str(device), backend=args.backend,
                                        dtype="bfloat16" if args.amp == "bf16" else "float32", tta=args.tta,
                                        batch_size=args.batch_size, input_size=args.input_size, compile=args.compile)
    if parser.compile_seconds is not None:
        print(f"compiled the forward in {parser.compile_seconds:.1f} s (not counted in the timings below)",
              file=sys.stderr, flush=True)
    found = find_images([Path(p) for p in args.images], args.recursive)
    check_images([image for image, _ in found])  # every input opens as an image, before anything is written
    jobs = plan_outputs(found, Path(args.out))   # refuses before anything is written
    outcome = predict_to_folder(parser, jobs, args.overwrite, progress=sys.stderr.isatty())
    renamed = [f"{job.image} -> {job.mask.name}" for job in outcome.written
               if job.mask.stem != job.image.stem]
    print(outcome.summary(Path(args.out)) + (f" (same names renamed: {'; '.join(renamed)})" if renamed else "")
          + f" [{parser}]")
    if outcome.failed:
        job, why = outcome.failed[0]
        raise DataError(f"{len(outcome.failed)} of {len(jobs)} images could not be read, the first {job.image} ({why}); "
                        f"{len(outcome.written)} written to {args.out}, {len(outcome.skipped)} skipped")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from msf.export import OPSET, export_onnx, file_digest
    from msf.parser import REFERENCE_MODEL
    from msf.train.checkpoint import build_model, read_model_file
    if args.out is None and args.onnx is None:
        raise ValueError("give the release's file name (OUT.safetensors), --onnx OUT.onnx, or both")
    checkpoint = Path(args.checkpoint) if args.checkpoint else REFERENCE_MODEL
    for out in filter(None, (args.out, args.onnx)):
        out = Path(out)
        if out.is_dir():
            raise ValueError(f"{out}: is a folder; give the file's name, e.g. {out / ('model' + out.suffix)}")
        if out.exists() and checkpoint.exists() and out.samefile(checkpoint):
            raise ValueError(f"{out}: is the checkpoint being exported; give the export another name "
                             "(nothing was written)")
    ckpt = read_model_file(checkpoint)  # read once: weights, configs and the epoch's metrics
    model = build_model(ckpt["model"], ckpt["model_config"], checkpoint)
    if args.out:
        write_release(model, ckpt["config"], Path(args.out), extra={"metrics": ckpt["metrics"]})
        print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.2f} MB)")
    if args.onnx:
        size = args.input_size or ckpt["config"].get("image_size") or 512
        export_onnx(model.eval(), size, Path(args.onnx), file_digest(checkpoint))
        print(f"wrote {args.onnx} ({Path(args.onnx).stat().st_size / 1e6:.2f} MB, ONNX opset {OPSET}: any batch and "
              f"image size in, logits at that size out, the model at {size}²)")
    return 0


def cmd_bench(argv: list[str]) -> int:
    """`msf bench` hands its arguments (--help included) to the benchmark's own parser."""
    from msf.bench.suite import main as bench_main
    return bench_main(argv)


def cmd_demo(args: argparse.Namespace) -> int:
    from msf.model import MicroSegFormer, count_parameters
    slow = interpreted(args.backend, "cpu")
    _device("cpu", args.backend)
    torch.manual_seed(0)
    model = MicroSegFormer(backend=args.backend)
    images, masks = torch.randn(2, 3, args.size, args.size), torch.randint(0, NUM_CLASSES, (2, args.size, args.size))
    started = time.perf_counter()
    with tqdm(total=2, desc="forward+loss", disable=not slow, leave=False) as bar:
        loss = model.loss(images, masks)
        bar.update()
        bar.set_description("backward")
        loss.backward()
        bar.update()
    print(f"MicroSegFormer ({count_parameters(model):,} parameters, backend {args.backend}): "
          f"loss {loss.item():.4f}, forward+backward of 2×3×{args.size}×{args.size} in "
          f"{time.perf_counter() - started:.2f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msf", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train MicroSegFormer (SPEC §5 recipe)")
    add_config_arguments(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint; its "
                   "recipe holds (options that only say where and how it runs may change)")
    p.add_argument("--allow-changes", metavar="FIELD,...", help="with --resume: accept these changed recipe options, "
                   "e.g. --epochs 300 --allow-changes epochs to train a finished run longer")
    p.set_defaults(run=cmd_train)

    def add_model_options(p: argparse.ArgumentParser, checkpoint_required: bool = True) -> None:
        if checkpoint_required:
            p.add_argument("--checkpoint", required=True, help=".pt checkpoint or .safetensors release")
        else:
            p.add_argument("--checkpoint", default=None, help=".pt checkpoint, .safetensors release or .onnx export "
                           "(default: the committed reference model, models/reference.safetensors)")
        p.add_argument("--backend", default="eager", choices=["eager", "triton"])
        p.add_argument("--device", default="auto")
        p.add_argument("--amp", default="off", choices=["bf16", "fp16", "off"])
        p.add_argument("--input-size", type=int, default=None, help="model input size (default: training size)")
        p.add_argument("--compile", action="store_true",
                       help="run the forward under torch.compile (one graph, dynamic shapes); its compile time is "
                            "reported apart")
        p.add_argument("--tta", default="none", choices=list(TTA_MODES),
                       help="test-time augmentation: flip averages the logits of the image and its mirror "
                            "(left/right ids swapped back); eval then scores without and with it")

    p = sub.add_parser("eval", help="score a checkpoint on a split")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="score only the first N images of the split (in file-name order)")
    p.add_argument("--json", action="store_true", help="print the scores as JSON")
    add_model_options(p)
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("predict", help="write id masks and colour overlays for images and folders of images")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR",
                   help="image files, or folders whose images are predicted (their tree mirrored under --out)")
    p.add_argument("--out", required=True)
    p.add_argument("--recursive", action="store_true", help="look in the folders' subfolders too")
    p.add_argument("--overwrite", action="store_true", help="redo images whose outputs exist (default: skip them)")
    p.add_argument("--engine", default="auto", choices=["auto", "torch", "onnxruntime"],
                   help="auto: onnxruntime on a CPU when installed (the fastest there), else torch; onnxruntime "
                        "exports the checkpoint to ONNX on first use (cached), or takes an .onnx --checkpoint")
    p.add_argument("--batch-size", type=int, default=8, help="images of one size parsed together")
    add_model_options(p, checkpoint_required=False)
    p.set_defaults(run=cmd_predict)

    p = sub.add_parser("export", help="write a checkpoint as an fp16 safetensors release and/or an ONNX model")
    p.add_argument("checkpoint", nargs="?", default=None,
                   help=".pt checkpoint or .safetensors release (default: models/reference.safetensors)")
    p.add_argument("out", nargs="?", default=None, help="the fp16 .safetensors release to write")
    p.add_argument("--onnx", metavar="OUT.onnx", default=None,
                   help="also (or only) write the model as ONNX: normalised images of any batch and size in, logits "
                        "at that size out (resize, model with its classifier at H/4, upsample: msf.export)")
    p.add_argument("--input-size", type=int, default=None, help="the size the ONNX model resizes images to "
                   "(default: the training size)")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("bench", help="eager vs torch.compile vs triton, per op and per step (msf bench --help)",
                       add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER)  # (main hands `msf bench ...` over before parsing)

    p = sub.add_parser("demo", help="one forward/backward pass on random data")
    p.add_argument("--backend", default="eager", choices=["eager", "triton"])
    p.add_argument("--size", type=int, default=128)
    p.set_defaults(run=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv else "msf"
    try:
        if command == "bench":
            return cmd_bench(argv[1:])
        args = build_parser().parse_args(argv)
        args.argv = argv[1:]
        return args.run(args)
    except (DataError, CheckpointError, ValueError, OSError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"msf {command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # train's `Interrupted` says where its last checkpoint is
        print(f"msf {command}: {str(exc) or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
