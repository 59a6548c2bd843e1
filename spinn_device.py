"""spinn-device: run a frame stream through a SPINN model split across device and server.

Thin CLI (STYLE.md habit 5): the flags of spinn.runtime.flags.DEVICE_FLAGS →
DeviceConfig and a frame source → spinn.runtime.device_process.run_device.  One JSON line per frame on stdout (or --out),
a live status line and the final summary on stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from spinn.runtime.config import DeviceConfig
    from spinn.runtime.sources import FrameSource

__all__ = ["build_parser", "config_from_args", "main", "open_source"]


_DESCRIPTION = (
    "Run frames through a progressive model split between this device and a SPINN server: "
    "early exits answer locally, the rest is offloaded at the split; the device keeps "
    "computing while the server works, the first answer wins, and the device finishes "
    "frames itself when the server is slow or down."
)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``spinn-device``'s flags (``spinn.runtime.flags.DEVICE_FLAGS``)."""
    from spinn.runtime.flags import DEVICE_FLAGS

    return DEVICE_FLAGS.build_parser("spinn-device", _DESCRIPTION)


def config_from_args(args: argparse.Namespace) -> DeviceConfig:
    """The DeviceConfig the parsed flags describe."""
    from spinn.runtime.config import DeviceConfig
    from spinn.runtime.flags import DEVICE_FLAGS, sla_from_args

    default = DeviceConfig().link.server
    assert default is not None
    servers = [a for group in args.server for a in group] if args.server else [default]
    return DEVICE_FLAGS.config_from_args(  # type: ignore[no-any-return]
        args,
        sla=sla_from_args(args),
        server=None if args.device_only else servers[0],
        extra_servers=() if args.device_only else tuple(servers[1:]),
    )


def open_source(args: argparse.Namespace, class_names: tuple[str, ...] = ()) -> FrameSource:
    """The frame source the flags name."""
    from spinn.runtime.sources import (
        CaptureSource,
        ImageFolderSource,
        camera_target,
        dataset_source,
    )

    if args.camera is not None:
        return CaptureSource(camera_target(args.camera), kind="camera", limit=args.limit)
    if args.video is not None:
        return CaptureSource(str(args.video), kind="video", limit=args.limit)
    if args.images is not None:
        return ImageFolderSource(args.images, class_names=class_names, limit=args.limit)
    return dataset_source(args.dataset, limit=args.limit, data_dir=args.data_dir)


# The SLA flags each policy reads (spinn.decisions.baselines.make_policy), None: all; others read none.
_SLA_READERS: dict[str, tuple[str, ...] | None] = {
    "spinn": None,
    "spinn-no-ee": None,
    "edgent": ("--sla", "--max-latency-ms"),
}


def unread_flags(args: argparse.Namespace) -> list[str]:
    """A warning for each group of flags given that the rest of the command line ignores."""
    from spinn.runtime.config import PolicyConfig
    from spinn.runtime.flags import sla_flags_given

    warnings = []
    policy = args.policy or PolicyConfig.policy
    read = _SLA_READERS.get(policy, ())
    unread = [f for f in sla_flags_given(args) if read is not None and f not in read]
    if unread:
        warnings.append(
            f"{', '.join(unread)} ignored with --policy {policy}: the SLA acts with --policy spinn"
        )
    fixed = [f for f, v in (("--split", args.split), ("--thr", args.thr)) if v is not None]
    if fixed and policy != "fixed":
        warnings.append(
            f"{', '.join(fixed)} ignored with --policy {policy}: the policy chooses "
            "split and threshold; they act with --policy fixed"
        )
    if args.device_only and args.server:
        warnings.append("--server ignored with --device-only: nothing is offloaded")
    if args.data_dir and not (args.dataset or "").startswith("fashion-mnist"):
        warnings.append("--data-dir ignored: it is where --dataset fashion-mnist is read from")
    return warnings


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``spinn-device``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    from spinn.runtime.flags import DEVICE_FLAGS

    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(DEVICE_FLAGS.flag_text(str(exc)))
    for warning in unread_flags(args):
        logging.getLogger("spinn.device").warning("%s", warning)
    import uvloop

    from spinn.decisions.offline_profile import ProfileError
    from spinn.model.checkpoint import CheckpointError, read_checkpoint
    from spinn.runtime.device import DeviceError
    from spinn.runtime.device_process import run_device
    from spinn.runtime.sources import SourceError

    try:
        meta = read_checkpoint(config.compute.checkpoint)["meta"]
        class_names = tuple(meta.get("class_names", ()))
        source = open_source(args, class_names)
    except (SourceError, CheckpointError) as exc:
        print(f"spinn-device: {exc}", file=sys.stderr)
        return 2
    try:
        out = open(args.out, "w", encoding="utf-8") if args.out else None  # noqa: SIM115
    except OSError as exc:
        source.close()
        print(f"spinn-device: cannot write --out {args.out}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        uvloop.run(run_device(config, source, out=out, show_status=not args.no_status))
    except (DeviceError, CheckpointError, ProfileError, SourceError) as exc:
        print(f"spinn-device: {DEVICE_FLAGS.flag_text(str(exc))}", file=sys.stderr)
        return 2
    finally:
        if out is not None:
            out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
