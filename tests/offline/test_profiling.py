"""Offline profiler: bytes per codec on real activations, stage timings, exit rates."""

from __future__ import annotations

import dataclasses
import functools
import itertools
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch

from protocol.packing import CODECS, pack, unpack
from spinn.decisions.offline_profile import Profile
from spinn.model.checkpoint import ModelConfig, load_checkpoint, save_checkpoint
from spinn.model.progressive import InputSpec, ProgressiveModel
from spinn.offline.data import FASHION_MNIST_DIR, load_dataset, load_mnist_5k
from spinn.offline.evaluate import evaluate_model
from spinn.offline.profiling import (
    LOSSY_BITS_TRIED,
    ProfilerConfig,
    choose_lossy_bits,
    codec_names,
    drop_with_bound,
    lossy_accuracy_drop_pts,
    measure_precision_bytes,
    measure_precisions,
    profile_model,
    reprofile_precisions,
    time_stages,
)

SPEC = InputSpec(channels=1, height=28, width=28, mean=(0.13,), std=(0.31,))
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[2] / "models" / "default" / "model.pt"
CONFIG = ModelConfig(arch="resnet20", input_spec=SPEC, num_classes=10, arch_options={"width": 4})


@functools.cache
def _checkpoint(tmp: str) -> Path:
    torch.manual_seed(2)
    path = Path(tmp) / "m.pt"
    save_checkpoint(path, CONFIG.build().eval(), CONFIG, class_names=[str(d) for d in range(10)])
    return path


def test_profile_is_valid_and_consistent(tmp_path_factory: pytest.TempPathFactory) -> None:
    model, meta = load_checkpoint(_checkpoint(str(tmp_path_factory.mktemp("p"))))
    data = load_mnist_5k("test")
    cfg = ProfilerConfig(calibration_size=60, bytes_inputs=8, timing_inputs=2, repeats=3, warmup=1)
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    prof = profile_model(model, meta, data, cfg, now=when)
    assert prof.model_id == meta.model_id and prof.weights_sha256 == meta.weights_sha256
    assert prof.num_stages == model.num_stages
    assert prof.exit_stages == tuple(model.exit_stages)
    assert prof.calibration_size == 60 and prof.created == "2026-01-02T03:04:05+00:00"
    assert prof.device_threads == 1 and prof.server_threads == 1
    assert set(prof.codecs) == set(codec_names())
    for s, sp in enumerate(prof.splits):
        assert sp.shape == model.split_shape(s)
        assert sp.bytes["float32"] == 4 * sp.numel
        assert sp.bytes["float16"] == 2 * sp.numel
        assert sp.bytes["int8"] == sp.numel
        if 0 < s < model.num_stages and model.split_names[s] != "pool":
            # ReLU outputs are sparse: the sparse codec beats dense int8 there.
            assert sp.bytes["sparse_int8"] < sp.bytes["int8"]
    # The global average pooling's output is dense but small: the cut after it sends
    # fewer bytes than the ReLU output it pools would have.
    last = model.num_stages - 1
    assert model.split_names[last] == "pool"
    assert prof.splits[last].bytes["int8"] < prof.splits[last - 1].bytes["sparse_int8"]
    assert all(t > 0 for t in prof.stage_device_ms + prof.stage_server_ms)
    ev = evaluate_model(model, data.head(60), model_id=meta.model_id, thresholds=[0.5, 0.9])
    assert prof.exit_accuracy == pytest.approx(ev.exit_accuracy)
    for row in ev.rows:
        assert prof.exit_rate(row.thr_conf) == pytest.approx(row.exit_rate)
        assert prof.accuracy(row.thr_conf) == pytest.approx(row.accuracy)
    path = tmp_path_factory.mktemp("out") / "profile.json"
    prof.save(path)
    assert Profile.load(path) == prof


def test_time_stages_takes_median_of_injected_clock() -> None:
    model = CONFIG.build().eval()
    ticks = itertools.count()
    # Every clock read advances 1 ms: each timed stage measures exactly 1 ms.
    ms = time_stages(
        model,
        torch.zeros(1, *SPEC.shape),
        threads=1,
        repeats=3,
        warmup=1,
        clock=lambda: next(ticks) / 1000.0,
    )
    assert ms == pytest.approx([1.0] * model.num_stages)


def test_profiler_config_errors() -> None:
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        ProfilerConfig(repeats=0)
    with pytest.raises(ValueError, match="thresholds must lie in"):
        ProfilerConfig(thresholds=(0.5, 1.5))
    assert len(codec_names()) == 2 * len(CODECS)


def test_calibration_shape_mismatch(tmp_path: Path) -> None:
    model, meta = load_checkpoint(_checkpoint(str(tmp_path)))
    rgb = load_mnist_5k("test").head(4)
    rgb = type(rgb)(rgb.images.repeat(1, 3, 1, 1), rgb.labels, rgb.class_names, "rgb")
    with pytest.raises(ValueError, match="do not match the model input"):
        profile_model(model, meta, rgb, ProfilerConfig(repeats=1))


@pytest.fixture(scope="module")
def shipped() -> tuple[ProgressiveModel, torch.Tensor, torch.Tensor]:
    """The shipped model and 300 of its test images (preprocessed) with their labels."""
    model, meta = load_checkpoint(DEFAULT_CHECKPOINT)
    spec = model.input_spec
    data = load_dataset("fashion-mnist", "test", channels=1, size=(spec.height, spec.width))
    head = data.head(300)
    return model, spec.preprocess(head.images), head.labels


def _drop_pts(
    model: ProgressiveModel, x: torch.Tensor, y: torch.Tensor, split: int, bits: int
) -> float:
    """The accuracy drop of PROTOCOL.md §6.9.1, computed plainly: every input's activation
    through sparse_uintb alone, the largest drop over the exits after the split."""
    with torch.inference_mode():
        act = x
        for k in range(split):
            act = model.run_trunk(k, act)
        coded = torch.cat(
            [
                torch.from_numpy(unpack(pack(a[None].numpy(), "sparse_uintb", bits=bits)))
                for a in act
            ]
        )
        drops = []
        for k in range(split, model.num_stages):
            act, coded = model.run_trunk(k, act), model.run_trunk(k, coded)
            e = model.exit_at_stage(k)
            if e is not None:
                right = (model.run_exit(e, act).argmax(1) == y).sum().item()
                right_coded = (model.run_exit(e, coded).argmax(1) == y).sum().item()
                drops.append(100.0 * (right - right_coded) / len(y))
    return max(0.0, max(drops))


def test_drop_bound_is_the_paired_differences_upper_confidence_bound() -> None:
    # 1,000 inputs, two exits. Exit 0: 30 answers turned wrong, 10 turned right (drop 2
    # points); exit 1: 5 turned wrong. The bound of each is mean + 1.645·sd/√N over the
    # per-input differences (+1, −1 or 0); the larger is reported.
    n = 1000
    reference = torch.ones(2, n, dtype=torch.bool)
    coded = reference.clone()
    coded[0, :30] = False
    reference[0, 30:40] = False
    coded[1, :5] = False
    drop, upper = drop_with_bound(reference, coded)
    diff = torch.zeros(n, dtype=torch.float64)
    diff[:30], diff[30:40] = 1.0, -1.0
    expected = 100 * (diff.mean() + 1.645 * diff.std() / n**0.5).item()
    assert drop == pytest.approx(2.0) and upper == pytest.approx(expected)
    assert upper > drop + 0.5  # 40 changed answers in 1,000 leave a wide bound
    # Nothing changed: no drop, no spread.
    assert drop_with_bound(reference, reference) == (0.0, 0.0)
    # The codec helping a little on average (10 answers turned wrong, 12 right): the drop
    # reads 0, the bound stays above it.
    helped = torch.ones(1, n, dtype=torch.bool)
    helped[0, :12] = False
    coded = torch.ones(1, n, dtype=torch.bool)
    coded[0, 12:22] = False
    drop, upper = drop_with_bound(helped, coded)
    assert drop == 0.0 and upper > 0.5


@pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(),
    reason="Debian's dataset-fashion-mnist is not installed",
)
@pytest.mark.parametrize(("split", "bound"), [(8, 0.5), (4, 1.0)])
def test_lossy_width_is_the_fewest_bits_within_the_bound(
    shipped: tuple[ProgressiveModel, torch.Tensor, torch.Tensor], split: int, bound: float
) -> None:
    model, x, y = shipped
    choice = choose_lossy_bits(model, x, y, split, bound)
    assert choice is not None and choice.bound_pts == bound
    assert choice.accuracy_drop_pts == pytest.approx(
        _drop_pts(model, x, y, split, choice.bits), abs=1e-4
    )
    # Chosen on the upper confidence bound of the drop, not the drop alone.
    assert choice.drop_bound_pts is not None
    assert choice.accuracy_drop_pts <= choice.drop_bound_pts <= bound
    assert lossy_accuracy_drop_pts(model, x, y, split, choice.bits) == pytest.approx(
        _drop_pts(model, x, y, split, choice.bits)
    )
    measured = measure_precisions(model, x, y, split, bound)
    assert [b for b, _, _ in measured] == [b for b in LOSSY_BITS_TRIED if b <= choice.bits]
    assert measured[-1] == (choice.bits, choice.accuracy_drop_pts, choice.drop_bound_pts)
    assert all(upper > bound for _, _, upper in measured[:-1]), "fewer bits are over"
    for bits, drop, _ in measured:
        assert drop == pytest.approx(_drop_pts(model, x, y, split, bits), abs=1e-4)
    # Split 0 carries the normalised input, which is negative: the codec cannot.
    assert choose_lossy_bits(model, x, y, 0, bound) is None
    # A bound of 100 points allows the fewest bits tried.
    assert choose_lossy_bits(model, x, y, split, 100.0).bits == min(LOSSY_BITS_TRIED)  # type: ignore[union-attr]


def test_precision_only_reprofile_keeps_everything_else(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # `spinn profile --precision-only`: the widths measured anew on the first inputs, their
    # bytes and the choice within the bound; timings, exit rates and other bytes kept.
    model, meta = load_checkpoint(_checkpoint(str(tmp_path_factory.mktemp("r"))))
    data = load_mnist_5k("test")
    cfg = ProfilerConfig(calibration_size=40, bytes_inputs=4, timing_inputs=2, repeats=2,
                         warmup=0, lossy_inputs=40, lossy_bound_pts=None)  # fmt: skip
    before = profile_model(model, meta, data, cfg)
    assert all(not sp.precisions and sp.lossy is None for sp in before.splits)
    assert before.precision_inputs == 0 and before.precision_data == ""
    # The widths on other images (the training split, as spinn profile measures them);
    # their bytes on the profile's own.
    train = load_mnist_5k("train")
    after = reprofile_precisions(
        model,
        before,
        data,
        dataclasses.replace(cfg, lossy_bound_pts=100.0, lossy_inputs=30),
        train,
    )
    assert after.precision_inputs == 30 and after.precision_data == train.name
    again = reprofile_precisions(
        model, after, data, dataclasses.replace(cfg, lossy_bound_pts=100.0)
    )
    assert again.precision_data == data.name
    x_bytes = model.input_spec.preprocess(data.images[:4])
    widths = [[w.bits for w in sp.precisions] for sp in after.splits]
    assert [
        {w.bits: w.bytes for w in sp.precisions} for sp in after.splits
    ] == measure_precision_bytes(model, x_bytes, widths)
    assert after.stage_device_ms == before.stage_device_ms
    assert after.thresholds == before.thresholds
    for sp_before, sp in zip(before.splits, after.splits, strict=True):
        lossless = {k: v for k, v in sp.bytes.items() if not k.startswith("sparse_uintb")}
        assert lossless == sp_before.bytes
        if sp.lossy is None:  # split 0 (negative input) and none else: any width is in 100
            assert sp.split == 0 and not sp.precisions
            continue
        # A 100-point bound takes the fewest bits tried, measured alone.
        assert sp.lossy.bits == min(LOSSY_BITS_TRIED) == sp.precisions[-1].bits
        assert len(sp.precisions) == 1
        assert sp.bytes["sparse_uintb+zstd"] == sp.precisions[0].bytes["sparse_uintb+zstd"]
