"""sparse_uintb between a real device and server on loopback (PROTOCOL.md §6.9).

The device offers the lossy codec beside sparse_int8 and packs at the width its policy
decides: the scheduler's choice of precision, or under a fixed split the width the
profile records there (§6.9.1); a lossless decision goes as sparse_int8.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from protocol.packing import IMAGE_CODEC, LOSSY_CODEC, pack, unpack
from spinn.decisions.offline_profile import Profile
from spinn.decisions.online_estimates import Estimates
from spinn.decisions.policy import Decision
from spinn.decisions.scheduler import Scheduler, SchedulerConfig
from spinn.decisions.sla import SLA, Metric
from spinn.model.checkpoint import load_checkpoint
from spinn.model.exits import ExitRule
from spinn.model.inference import run_stages
from spinn.offline.data import load_fashion_mnist
from spinn.runtime.device_compute import recode
from spinn.runtime.device_core import recode_target
from spinn.runtime.sources import ArraySource
from tests.support.runtime import CHECKPOINT, PATIENT, by_frame, run_in_process

pytestmark = pytest.mark.timeout(120)

N = 24
SPLIT = 5
# Every frame answered by the server from its final exit (no early exit at 1.0 here).
FIXED = {"policy": "fixed", "split": SPLIT, "thr_conf": 1.0, "continue_locally": False, **PATIENT}


def _images() -> ArraySource:
    data = load_fashion_mnist("test").head(N)
    return ArraySource(data.images[:, 0].numpy(), data.labels.numpy(), name="fashion-mnist")


def _copy_with_width(tmp_path: Path, bits: int | None) -> Path:
    """The default checkpoint and its profile, split 5's sparse_uintb width set to
    `bits` (None: none), and no dictionaries (the device would prefer them)."""
    tmp_path.mkdir(parents=True)
    checkpoint = tmp_path / "model.pt"
    shutil.copy(CHECKPOINT, checkpoint)
    doc = json.loads(CHECKPOINT.with_name("profile.json").read_text())
    entry = doc["splits"][SPLIT]
    entry.pop("lossy", None)
    if bits is not None:
        entry["lossy"] = {"bits": bits, "accuracy_drop_pts": 0.0, "bound_pts": 0.5}
    (tmp_path / "profile.json").write_text(json.dumps(doc))
    return checkpoint


def test_each_split_crosses_at_its_profiled_width(tmp_path: Path) -> None:
    lossy = run_in_process(_copy_with_width(tmp_path / "a", 3), _images(), zstd="never",
                           codec=LOSSY_CODEC, **FIXED)  # fmt: skip
    plain = run_in_process(_copy_with_width(tmp_path / "b", None), _images(), zstd="never",
                           codec=LOSSY_CODEC, **FIXED)  # fmt: skip
    assert lossy.device.compute.codecs == (LOSSY_CODEC, "sparse_int8")
    coded, uncoded = by_frame(lossy.records, N), by_frame(plain.records, N)
    assert {r["where"] for r in coded} == {"server"} == {r["where"] for r in uncoded}
    # What each frame's activation packs to at 3 bits, and with sparse_int8 where split 5
    # has no width: the bytes the device sent, to the framing's few bytes a message.
    model, _ = load_checkpoint(CHECKPOINT)
    data = load_fashion_mnist("test").head(N)
    expected_classes = []
    for i, (with_width, without) in enumerate(zip(coded, uncoded, strict=True)):
        x = model.input_spec.preprocess(data.images[i : i + 1])
        act = run_stages(model, x, 0, SPLIT, ExitRule(None)).activation
        assert act is not None
        three = pack(act.numpy(), LOSSY_CODEC, False, bits=3)
        eight = pack(act.numpy(), "sparse_int8", False)
        overhead = with_width["bytes_sent"] - three.nbytes
        assert 0 < overhead == without["bytes_sent"] - eight.nbytes < 200
        decoded = torch.from_numpy(unpack(three))
        out = run_stages(model, decoded, SPLIT, model.num_stages, ExitRule(1.0))
        assert out.answer is not None
        expected_classes.append(out.answer.label)
    # The server answered from the 3-bit activation: its classes are the offline model's
    # on the decoded tensor.
    agree = np.mean([r["class"] == c for r, c in zip(coded, expected_classes, strict=True)])
    assert agree >= 23 / 24, agree


class _AtOneMbit:
    """The scheduler as the device runs it, but planning for a 1 Mbit/s uplink whatever
    loopback measures: the estimates are the system's edge, faked here."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def decide(self, now: float, estimates: Estimates) -> Decision:
        return self.scheduler.decide(now, Estimates(bandwidth_bps=1e6, latency_s=0.005))


@pytest.mark.parametrize("bound_pts", [None, 0.5])
def test_the_precision_the_scheduler_chooses_is_what_crosses(
    tmp_path: Path, bound_pts: float | None
) -> None:
    # Split 5, no early exit, fastest first at 1 Mbit/s: the scheduler takes the fewest
    # bits profiled there; within a 0.5-point loss bound, only a width whose drop bound is
    # within it. Each frame's INFER carries exactly that width's packing.
    checkpoint = _copy_with_width(tmp_path / "m", None)
    profile = Profile.load(checkpoint.with_name("profile.json"))
    widths = [w.bits for w in profile.splits[SPLIT].precisions]
    assert len(widths) >= 2, "the shipped profile measures several widths at split 5"
    floor = None if bound_pts is None else profile.exit_accuracy[-1] - bound_pts / 100
    sla = SLA(min_accuracy=floor, rank=(Metric.LATENCY,))
    # No local race, as the device runs (the race would answer every frame locally first).
    config = SchedulerConfig(lossy=True, codec="sparse_int8+zstd", local_race=False)
    scheduler = Scheduler(profile, sla, config, early_exits=False, splits=(SPLIT,))
    chosen = scheduler.decide(0.0, Estimates(bandwidth_bps=1e6, latency_s=0.005)).bits
    if bound_pts is None:
        assert chosen == min(widths)
    else:
        assert chosen is not None and chosen > min(widths)
        assert profile.splits[SPLIT].precision(chosen).drop_bound_pts <= bound_pts
    run = run_in_process(checkpoint, _images(), zstd="never", codec=LOSSY_CODEC,
                         continue_locally=False, custom_policy=_AtOneMbit(scheduler),
                         **PATIENT)  # fmt: skip
    records = by_frame(run.records, N)
    assert {r["where"] for r in records} == {"server"}
    model, _ = load_checkpoint(CHECKPOINT)
    data = load_fashion_mnist("test").head(N)
    overheads = set()
    for i, record in enumerate(records):
        x = model.input_spec.preprocess(data.images[i : i + 1])
        act = run_stages(model, x, 0, SPLIT, ExitRule(None)).activation
        assert act is not None
        overheads.add(
            record["bytes_sent"] - pack(act.numpy(), LOSSY_CODEC, False, bits=chosen).nbytes
        )
    # One framing overhead for every frame (a message's few bytes): the payloads were the
    # chosen width's, byte for byte in length.
    assert len(overheads) == 1 and 0 < overheads.pop() < 200


def test_a_lossy_tensor_is_recoded_for_a_link_without_the_codec() -> None:
    # After a reconnection to a server that does not take sparse_uintb, a tensor packed
    # for the old link goes as sparse_int8 of the values it decodes to; pixels at split 0
    # for a server without uint8_image go as the float input, never sparse_uintb.
    model, _ = load_checkpoint(CHECKPOINT)
    data = load_fashion_mnist("test").head(1)
    x = model.input_spec.preprocess(data.images)
    act = run_stages(model, x, 0, SPLIT, ExitRule(None)).activation
    assert act is not None
    packed = pack(act.numpy(), LOSSY_CODEC, True, bits=4)
    # What DeviceCore.recode_to names for the link (recode_target), then what
    # DeviceModel.recode does with it (recode).
    assert recode_target(packed.codec, LOSSY_CODEC, (LOSSY_CODEC,)) is None  # as it is
    target = recode_target(packed.codec, "sparse_int8", ("sparse_int8",))
    assert target == "sparse_int8"
    plain = recode(packed, target, None)
    assert plain.codec == "sparse_int8"
    np.testing.assert_allclose(unpack(plain), unpack(packed), atol=plain.scale / 2 * 1.001)
    pixels = pack(data.images.numpy().astype(np.uint8), IMAGE_CODEC, True)
    target = recode_target(pixels.codec, LOSSY_CODEC, (LOSSY_CODEC, "sparse_int8"))
    assert target == "sparse_int8"
    floats = recode(pixels, target, None, input_spec=model.input_spec)
    assert floats.codec == "sparse_int8"
    np.testing.assert_allclose(unpack(floats), x.numpy(), atol=floats.scale / 2 * 1.001)
