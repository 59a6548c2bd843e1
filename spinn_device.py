"""spinn-device: run a frame stream through a SPINN model split across device and server.

Thin CLI (STYLE.md habit 5): argparse → DeviceConfig and a frame source →
spinn.runtime.device.run_device.  One JSON line per frame on stdout (or --out),
a live status line and the final summary on stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from spinn.runtime.device import DeviceConfig
    from spinn.sources import FrameSource

__all__ = ["build_parser", "config_from_args", "main", "open_source"]


def _host_ports(value: str) -> tuple[tuple[str, int], ...]:
    from spinn.runtime.failover import parse_addresses

    try:
        return parse_addresses(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _fraction(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value!r}") from None
    if not 0.0 <= x <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {x}")
    return x


def build_parser() -> argparse.ArgumentParser:
    from spinn.pretrained import DEFAULT_CHECKPOINT
    from spinn.runtime.device import ACTIVATION_CODECS, DeviceConfig

    d = DeviceConfig()
    p = argparse.ArgumentParser(
        prog="spinn-device",
        description="Run frames through a progressive model split between this device and a "
        "SPINN server: early exits answer locally, the rest is offloaded at the split; the "
        "device keeps computing while the server works, the first answer wins, and the "
        "device finishes frames itself when the server is slow or down.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--camera", metavar="INDEX|URL", help="OpenCV camera index or stream URL")
    src.add_argument("--video", type=Path, metavar="FILE", help="video file")
    src.add_argument("--images", type=Path, metavar="DIR", help="directory of images")
    src.add_argument(
        "--dataset",
        metavar="NAME[:SPLIT]",
        help="replay a labelled dataset: fashion-mnist[:test|train], "
        "fashion-mnist-camera[:test|train] (the same images as 3x96x96 RGB frames) or mnist",
    )
    p.add_argument("--data-dir", help="directory of the Fashion-MNIST IDX files")
    p.add_argument(
        "--rate", type=float, default=None, help="frames per second (default: as fast as possible)"
    )
    p.add_argument("--limit", type=int, default=None, help="stop after N frames")
    p.add_argument(
        "--checkpoint",
        "--model",
        type=Path,
        default=DEFAULT_CHECKPOINT,
        help="checkpoint (must be the server's; default: the shipped model)",
    )
    p.add_argument(
        "--allow-user-code",
        action="store_true",
        help="trust and import the model code the checkpoint names (a model trained with "
        "spinn train --arch package.module:callable; the module must be importable)",
    )
    p.add_argument("--profile", type=Path, help="offline profile (default: beside the checkpoint)")
    p.add_argument(
        "--server",
        type=_host_ports,
        action="append",
        default=None,
        metavar="HOST:PORT[,HOST:PORT...]",
        help="server address (default 127.0.0.1:7878); repeat it or give a comma list for "
        "several servers: on an outage the device fails over to the next one",
    )
    p.add_argument(
        "--device-only", action="store_true", help="never connect; everything runs locally"
    )
    from spinn.scheduler import POLICY_NAMES
    from spinn.sla import add_sla_arguments

    p.add_argument(
        "--policy",
        choices=("fixed", *POLICY_NAMES),
        default="fixed",
        help="how split and threshold are chosen (default: fixed): fixed keeps --split and "
        "--thr; spinn is the SPINN scheduler, working to the SLA flags below (they act only "
        "with spinn and spinn-no-ee; edgent reads --max-latency-ms); the others are baselines",
    )
    p.add_argument(
        "--split",
        type=int,
        help="with --policy fixed: the device runs the model's first SPLIT stages and the "
        "server the rest; 0 = server-only, S = device-only, where S is the model's number of "
        "stages (default: S // 2)",
    )
    p.add_argument(
        "--thr",
        type=_fraction,
        default=None,
        help=f"with --policy fixed: exit confidence threshold (default {d.thr_conf})",
    )
    p.add_argument(
        "--max-in-flight",
        type=int,
        default=d.max_in_flight,
        help=f"frames in the pipeline at once (default {d.max_in_flight})",
    )
    p.add_argument(
        "--no-continue",
        action="store_true",
        help="do not keep computing locally while the server works",
    )
    p.add_argument(
        "--codec",
        default=d.codec,
        choices=ACTIVATION_CODECS,
        help=f"activation codec (default {d.codec}: sparse int8 + zstd with the per-split "
        "dictionaries beside the checkpoint, model.zdict, when the server holds the same; "
        "otherwise sparse_int8)",
    )
    p.add_argument(
        "--no-image-codec",
        action="store_true",
        help="at split 0 send the preprocessed float input with --codec instead of the "
        "frame's uint8 pixels (uint8_image, PROTOCOL.md §6.8), as a device without that "
        "codec does",
    )
    p.add_argument(
        "--zstd",
        default=d.zstd,
        choices=("auto", "always", "never"),
        help="when to compress the activation: auto (default) when the transfer time it "
        "saves at the measured bandwidth exceeds its own, always for the fewest bytes "
        "(a metered link), never",
    )
    p.add_argument(
        "--probe-bytes",
        type=int,
        default=d.probe_bytes,
        help="largest padding of the PINGs that probe the uplink's bandwidth in trains "
        f"taking {d.probe_share * 100:g}%% of the link (default {d.probe_bytes}); 0 sends none, "
        "e.g. on a metered link: the bandwidth is then measured from uploads alone",
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        default=d.torch_threads,
        help=f"torch threads for device compute (default {d.torch_threads})",
    )
    p.add_argument(
        "--deadline-factor",
        type=float,
        default=d.deadline_factor,
        help="a RESULT may take this many times its expected time before the frame is "
        f"finished locally (default {d.deadline_factor})",
    )
    p.add_argument("--out", type=Path, help="write the per-frame JSON lines here, not stdout")
    p.add_argument("--no-status", action="store_true", help="no live status line")
    p.add_argument(
        "--status-interval",
        type=float,
        default=d.status_interval_s,
        help=f"seconds between status lines (default {d.status_interval_s})",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the reconnect jitter")
    p.add_argument(
        "--slowdown",
        type=float,
        default=d.slowdown,
        metavar="K",
        help="emulate a weaker device: each stage takes K times as long (default 1)",
    )
    sec = p.add_argument_group("security (docs/PROTOCOL.md §10)")
    sec.add_argument(
        "--token-file", type=Path, help="shared token (mode 600) to prove to the server"
    )
    sec.add_argument(
        "--tls", action="store_true", help="speak TLS, verifying the server with the system CAs"
    )
    sec.add_argument(
        "--tls-ca", type=Path, help="speak TLS, verifying the server with this PEM CA file"
    )
    sec.add_argument("--tls-cert", type=Path, help="client certificate (PEM) for mutual TLS")
    sec.add_argument("--tls-key", type=Path, help="private key of --tls-cert")
    sec.add_argument(
        "--misconfig-tries",
        type=int,
        default=d.misconfig_tries,
        help="give up (exit status 2, frames read still answered) after the handshake failed"
        " this many times in a row the same misconfigured way, e.g. TLS on one end only"
        f" (default {d.misconfig_tries})",
    )
    sec.add_argument(
        "--retry-forever",
        action="store_true",
        help="keep retrying a server that looks misconfigured, answering locally meanwhile",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    add_sla_arguments(p)
    return p


def config_from_args(args: argparse.Namespace) -> DeviceConfig:
    """The DeviceConfig the parsed flags describe."""
    from spinn.runtime.device import DeviceConfig
    from spinn.sla import sla_from_args

    default = DeviceConfig().server
    assert default is not None
    servers = [a for group in args.server for a in group] if args.server else [default]
    return DeviceConfig(
        policy=args.policy,
        sla=sla_from_args(args),
        checkpoint=args.checkpoint,
        allow_user_code=args.allow_user_code,
        profile=args.profile,
        server=None if args.device_only else servers[0],
        extra_servers=() if args.device_only else tuple(servers[1:]),
        split=args.split,
        thr_conf=DeviceConfig.thr_conf if args.thr is None else args.thr,
        rate_fps=args.rate,
        limit=args.limit,
        max_in_flight=args.max_in_flight,
        probe_bytes=args.probe_bytes,
        continue_locally=not args.no_continue,
        codec=args.codec,
        image_codec=not args.no_image_codec,
        zstd=args.zstd,
        torch_threads=args.torch_threads,
        deadline_factor=args.deadline_factor,
        status_interval_s=args.status_interval,
        seed=args.seed,
        slowdown=args.slowdown,
        tls=args.tls,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        token_file=args.token_file,
        misconfig_tries=args.misconfig_tries,
        retry_forever=args.retry_forever,
    )


def open_source(args: argparse.Namespace, class_names: tuple[str, ...] = ()) -> FrameSource:
    """The frame source the flags name."""
    from spinn.sources import CaptureSource, ImageFolderSource, camera_target, dataset_source

    if args.camera is not None:
        return CaptureSource(camera_target(args.camera), kind="camera", limit=args.limit)
    if args.video is not None:
        return CaptureSource(str(args.video), kind="video", limit=args.limit)
    if args.images is not None:
        return ImageFolderSource(args.images, class_names=class_names, limit=args.limit)
    return dataset_source(args.dataset, limit=args.limit, data_dir=args.data_dir)


# The SLA flags each policy reads (spinn.scheduler.make_policy), None: all; others read none.
_SLA_READERS: dict[str, tuple[str, ...] | None] = {
    "spinn": None,
    "spinn-no-ee": None,
    "edgent": ("--sla", "--max-latency-ms"),
}


def unread_flags(args: argparse.Namespace) -> list[str]:
    """A warning for each group of flags given that the rest of the command line ignores."""
    from spinn.sla import sla_flags_given

    warnings = []
    read = _SLA_READERS.get(args.policy, ())
    unread = [f for f in sla_flags_given(args) if read is not None and f not in read]
    if unread:
        warnings.append(
            f"{', '.join(unread)} ignored with --policy {args.policy}: the SLA acts with "
            "--policy spinn"
        )
    fixed = [f for f, v in (("--split", args.split), ("--thr", args.thr)) if v is not None]
    if fixed and args.policy != "fixed":
        warnings.append(
            f"{', '.join(fixed)} ignored with --policy {args.policy}: the policy chooses "
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
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    for warning in unread_flags(args):
        logging.getLogger("spinn.device").warning("%s", warning)
    import uvloop

    from spinn.checkpoint import CheckpointError, read_checkpoint
    from spinn.profile import ProfileError
    from spinn.runtime.device import DeviceError, run_device
    from spinn.sources import SourceError

    try:
        class_names = tuple(read_checkpoint(config.checkpoint)["meta"].get("class_names", ()))
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
        print(f"spinn-device: {exc}", file=sys.stderr)
        return 2
    finally:
        if out is not None:
            out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
