"""Shared by the runtime tests: a small real checkpoint with its profile, and helpers.

The model is a real ResNet-20 (width 8) progressive model with seeded random
weights: fast on two cores and bit-for-bit reproducible.  The profile holds
per-stage times measured here and activation sizes from the model itself.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch

from protocol import NEED_DATA, Connection
from spinn.checkpoint import ModelConfig, load_checkpoint, save_checkpoint
from spinn.profile import Profile
from spinn.progressive import InputSpec

ROOT = Path(__file__).resolve().parents[1]
PYTHON = str(ROOT / ".venv" / "bin" / "python")


# Files (and the global torch RNG state after building) of each seed already built in this
# process: a build takes seconds on two busy cores, and its output depends on the seed alone.
_BUILT: dict[int, tuple[bytes, bytes, torch.Tensor]] = {}


def make_small_checkpoint(directory: Path, seed: int = 0) -> Path:
    """Write ``model.pt`` and ``profile.json`` into ``directory``; returns the model path."""
    path = directory / "model.pt"
    if seed in _BUILT:
        model_bytes, profile_bytes, rng_state = _BUILT[seed]
        path.write_bytes(model_bytes)
        (directory / "profile.json").write_bytes(profile_bytes)
        torch.set_rng_state(rng_state)  # as if built here: callers may draw from it next
        return path
    _build_small_checkpoint(directory, seed)
    _BUILT[seed] = (path.read_bytes(), (directory / "profile.json").read_bytes(),
                    torch.get_rng_state())  # fmt: skip
    return path


def _build_small_checkpoint(directory: Path, seed: int) -> None:
    torch.manual_seed(seed)
    config = ModelConfig(
        arch="resnet20",
        input_spec=InputSpec(1, 28, 28, (0.286,), (0.353,)),
        num_classes=10,
        arch_options={"width": 8},
    )
    model = config.build().eval()
    path = directory / "model.pt"
    meta = save_checkpoint(path, model, config, class_names=[f"c{i}" for i in range(10)])
    model, meta = load_checkpoint(path)
    stages = model.num_stages
    splits = []
    for s in range(stages):
        shape = tuple(model.split_shape(s))
        numel = int(torch.tensor(shape).prod())
        splits.append({"split": s, "shape": list(shape), "numel": numel,
                       "bytes": {"float32": 4 * numel}})  # fmt: skip
    exits = len(model.exit_stages)
    Profile(
        model_id=meta.model_id,
        weights_sha256=meta.weights_sha256,
        arch=meta.arch,
        num_stages=stages,
        exit_stages=tuple(model.exit_stages),
        splits=tuple(splits),  # type: ignore[arg-type]
        stage_device_ms=(0.5,) * stages,
        stage_server_ms=(0.4,) * stages,
        exit_accuracy=(0.1,) * exits,
        thresholds=(  # type: ignore[arg-type]
            {"thr_conf": 0.0, "exit_rate": [1.0] + [0.0] * (exits - 1), "accuracy": 0.1},
            {"thr_conf": 1.0, "exit_rate": [0.0] * (exits - 1) + [1.0], "accuracy": 0.1},
        ),
        calibration_size=1,
    ).save(directory / "profile.json")


class RawClient:
    """A device end speaking the protocol by hand, to probe the server."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: Connection
    ):
        self.reader, self.writer, self.conn = reader, writer, conn

    @classmethod
    async def open(cls, port: int) -> RawClient:
        from protocol import Role

        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer, Connection(Role.DEVICE))

    def send(self, *events: object) -> None:
        self.writer.write(b"".join(self.conn.send(e) for e in events))  # type: ignore[arg-type]

    async def next(self, timeout: float = 5.0) -> object:
        while True:
            event = self.conn.next_event()
            if event is not NEED_DATA:
                return event
            data = await asyncio.wait_for(self.reader.read(1 << 16), timeout)
            self.conn.receive_data(data)

    def close(self) -> None:
        self.writer.close()
