"""The policy a device's configuration names, and the profile entries it predicts with.

Construction, not a decision of the run: ``SpinnDevice`` builds its ``DeviceCore`` with
the policy made here, once. It lives beside the runtime's configuration rather than in
``spinn.decisions`` because it reads ``DeviceConfig`` and the codecs the device packs
with (PROTOCOL.md §6.7–6.9), which the decisions package does not know; and apart from
the device's compute module, since it needs no model and no torch (``bench.scheduler``
predicts with ``profiled_codec`` too).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from protocol.packing import DICT_CODEC, IMAGE_CODEC, LOSSY_CODEC
from spinn.decisions.offline_profile import Profile
from spinn.decisions.policy import FixedPolicy, Policy
from spinn.decisions.sla import SLA
from spinn.runtime.device_core import DeviceError

if TYPE_CHECKING:
    from spinn.runtime.config import DeviceConfig

__all__ = ["configured_policy", "profiled_codec", "profiled_input_codec"]

log = logging.getLogger("spinn.device")


def profiled_codec(codec: str, zstd: str, profiled: Sequence[str]) -> str | None:
    """The entry of a profile (`spinn profile`, its codecs `profiled`) whose sizes are what
    packing with `codec` under ``--zstd`` sends: compressed unless zstd is off, since where
    upload time matters the packer compresses, and where it skips zstd, sending raw was
    the faster of the two. Failing that the nearest entry the profile has; None if none."""
    raw = "sparse_int8" if codec == DICT_CODEC else codec
    names: tuple[str, ...] = (raw,)
    if zstd != "never":
        names = (codec, "sparse_int8+zstd", raw) if codec == DICT_CODEC else (f"{raw}+zstd", raw)
    return next((n for n in names if n in profiled), None)


def profiled_input_codec(config: DeviceConfig, profile: Profile) -> str | None:
    """The profile entry whose size is what split 0 sends: the frame's pixels
    (``uint8_image``, zstd as `profiled_codec`), or None when the device sends the float
    input there (``image_codec`` off) or the profile has no such entry."""
    if not config.link.image_codec:
        return None
    return profiled_codec(IMAGE_CODEC, config.link.zstd, tuple(profile.splits[0].bytes))


def configured_policy(
    config: DeviceConfig,
    profile: Profile,
    codecs: tuple[str, ...],
    num_stages: int,
    policy: Policy | None,
) -> Policy:
    """The policy the configuration names (``policy`` given: that one), its split and
    threshold checked against the model."""
    split = num_stages // 2 if config.policy.split is None else config.policy.split
    if config.link.server is None and config.policy.split is None:
        split = num_stages  # no server: every stage runs here (device-only)
    if not 0 <= split <= num_stages:
        raise DeviceError(f"policy.split must be in 0..{num_stages}, got {split}")
    if not 0.0 <= config.policy.thr_conf <= 1.0:
        raise DeviceError(f"policy.thr_conf must be in [0, 1], got {config.policy.thr_conf}")
    if policy is not None:
        return policy
    if config.policy.policy == "fixed":
        # With sparse_uintb, the split's profiled width (PROTOCOL.md §6.9.1).
        width = profile.splits[split].lossy if split < num_stages else None
        bits = width.bits if width is not None and codecs[0] == LOSSY_CODEC else None
        return FixedPolicy(split, config.policy.thr_conf, bits)
    from spinn.decisions.baselines import make_policy
    from spinn.decisions.scheduler import SchedulerConfig

    # Upload sizes predicted with the codec this device packs with (docs/SCHEDULER.md,
    # "Predicted versus measured"); a profile that did not measure it leaves the smallest
    # profiled size. With sparse_uintb the scheduler chooses the precision: its lossless
    # candidates are what the device sends without a width, sparse_int8.
    lossy = codecs[0] == LOSSY_CODEC
    lossless = codecs[-1] if lossy else codecs[0]
    codec = profiled_codec(lossless, config.link.zstd, profile.codecs)
    if codec is None:
        log.warning(
            "codec %s not in the profile (%s): predicting with the smallest size",
            lossless,
            ", ".join(profile.codecs),
        )
    scheduler_config = SchedulerConfig(
        codec=codec,
        input_codec=profiled_input_codec(config, profile),
        lossy=lossy,
        # The in-flight window decides the race under load (docs/SCHEDULER.md).
        max_in_flight=config.source.max_in_flight,
    )
    try:
        return make_policy(
            config.policy.policy, profile, config.policy.sla or SLA(), scheduler_config
        )
    except ValueError as exc:
        raise DeviceError(f"policy.policy {config.policy.policy}: {exc}") from exc
