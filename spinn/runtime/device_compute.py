"""The device's compute, as its worker threads run it: the model, packing, codecs.

The asyncio adapter (``spinn.runtime.device``) runs ``DeviceModel.run_head`` and
``run_stages`` in its executor for the core's ``RunHead`` and ``RunStages`` actions
(``spinn.runtime.device_core``) and hands the results back to the core. Also here: what
the device offers and packs with (its codecs, the zstd dictionaries, re-coding for a
server that accepted less, PROTOCOL.md §6.7–6.9).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from protocol.dictionaries import DictionaryError, ZstdDictionaries
from protocol.packing import (
    DICT_CODEC,
    IMAGE_CODEC,
    LOSSY_CODEC,
    PackedTensor,
    as_sparse_int8,
    pack,
    unpack,
)
from spinn.decisions.offline_profile import Profile
from spinn.model.progressive import InputSpec
from spinn.runtime.compute import slow_down
from spinn.runtime.config import ZSTD_MODES
from spinn.runtime.device_core import (
    DeviceError,
    LocalExit,
    ModelShape,
    Plan,
    RunHead,
    RunStages,
)
from spinn.runtime.server_description import checkpoint_facts
from spinn.runtime.sources import Frame, input_pixels

if TYPE_CHECKING:
    from spinn.runtime.config import DeviceConfig

__all__ = ["DeviceModel", "HeadOutput", "StagesOutput", "recode"]

log = logging.getLogger("spinn.device")


class HeadOutput(NamedTuple):
    """What a ``RunHead`` gives ``DeviceCore.head_done`` (its keyword arguments)."""

    answer: LocalExit | None
    activation: torch.Tensor | None
    packed: PackedTensor | None
    stages_ms: float
    reached: int
    pack_ms: float


class StagesOutput(NamedTuple):
    """What a ``RunStages`` gives ``DeviceCore.stages_done`` (its keyword arguments)."""

    answer: LocalExit | None
    activation: Any
    stop: int
    stages_ms: float


def recode(
    packed: PackedTensor,
    target: str,
    dictionaries: ZstdDictionaries | None,
    zstd: str = "auto",
    input_spec: InputSpec | None = None,
) -> PackedTensor:
    """`packed` re-coded to `target` (``DeviceCore.recode_to``): pixels become the float
    input, normalised by `input_spec` as the server would have (PROTOCOL.md §6.8);
    sparse_uintb becomes the values it decodes to (§6.9: a second rounding, of at most half
    an int8 step); a tensor packed with the dictionaries becomes sparse_int8, lossless (the
    same int8 levels, `as_sparse_int8`)."""
    if packed.codec == IMAGE_CODEC:
        assert input_spec is not None
        x = input_spec.preprocess(torch.from_numpy(unpack(packed))).numpy()
        return pack(x, target, ZSTD_MODES[zstd], dictionaries=dictionaries, table=0)
    if packed.codec == DICT_CODEC:
        return as_sparse_int8(packed, dictionaries, ZSTD_MODES[zstd])
    return pack(unpack(packed), target, ZSTD_MODES[zstd])


class DeviceModel:
    """The checkpoint, its offline profile and zstd dictionaries, and the codecs the
    device offers; runs the core's compute actions on a worker thread."""

    def __init__(self, config: DeviceConfig) -> None:
        from spinn.model.checkpoint import load_checkpoint

        self.config = config
        self.model, self.meta = load_checkpoint(
            config.compute.checkpoint, allow_user_code=config.compute.allow_user_code
        )
        self.model.eval()
        slow_down(self.model, config.compute.slowdown)  # emulation only
        self.dictionaries = self._load_dictionaries()
        self.codecs: tuple[str, ...] = (
            (DICT_CODEC, "sparse_int8")
            if self.dictionaries is not None
            # sparse_uintb where the server takes it, at the decision's width (PROTOCOL.md
            # §6.9; none: lossless), else sparse_int8, which every server takes.
            else (LOSSY_CODEC, "sparse_int8")
            if config.link.codec == LOSSY_CODEC
            else ("sparse_int8" if config.link.codec == DICT_CODEC else config.link.codec,)
        )
        """Activation codecs, preferred first; the last is what every server takes."""
        self.offered_codecs = (
            (*self.codecs, IMAGE_CODEC) if config.link.image_codec else self.codecs
        )
        """Codecs offered in HELLO: the activation codecs, then the split-0 pixels (§6.8)."""
        self.dictionaries_sha256 = "" if self.dictionaries is None else self.dictionaries.sha256
        profile_path = config.policy.profile or Path(config.compute.checkpoint).with_name(
            "profile.json"
        )
        if not Path(profile_path).is_file():
            raise DeviceError(
                f"offline profile {profile_path} not found (make one with `spinn profile`)"
            )
        self.profile = Profile.load(profile_path)
        if self.profile.model_id != self.meta.model_id:
            raise DeviceError(
                f"profile {profile_path} is for model {self.profile.model_id!r}, "
                f"checkpoint is {self.meta.model_id!r}"
            )

    @property
    def shape(self) -> ModelShape:
        """What the core needs to know of the model."""
        return ModelShape(
            self.model.num_stages,
            tuple(self.model.exit_stages),
            self.model.num_classes,
            tuple(self.meta.class_names or ()),
            checkpoint_facts(self.model, self.meta),
        )

    def recode(self, packed: PackedTensor, target: str) -> PackedTensor:
        """``packed`` re-coded to ``target``, the codec the core names (``recode``)."""
        return recode(
            packed, target, self.dictionaries, self.config.link.zstd, self.model.input_spec
        )

    def _exit(self, answer: Any) -> LocalExit | None:
        """An exit's answer as the core takes it: its top-k classes."""
        if answer is None:
            return None
        top = answer.topk(self.config.output.top_k)
        return LocalExit(answer.exit, tuple(c for c, _ in top), tuple(p for _, p in top))

    def _run_range(self, act: torch.Tensor, start: int, stop: int, plan: Plan) -> Any:
        """Worker thread: stages [start, stop) with exit checks; a truncated network's
        forced exit always answers (``iter_stages``' ``final_exit``)."""
        from spinn.model.inference import run_stages

        return run_stages(self.model, act, start, stop, plan.rule, final_exit=plan.forced_exit)

    def run_stages(self, action: RunStages) -> StagesOutput:
        """Worker thread: one ``RunStages``; its answer or activation, and its time in ms."""
        t0 = time.perf_counter()
        out = self._run_range(action.activation, action.start, action.stop, action.plan)
        ms = (time.perf_counter() - t0) * 1e3
        return StagesOutput(self._exit(out.answer), out.activation, out.stop, ms)

    def run_head(self, frame: Frame, action: RunHead) -> HeadOutput:
        """Worker thread: preprocess, stages [0, split), pack if the frame goes out; the
        stage and packing times in ms. At split 0 the frame's pixels go out as they are
        where the server takes them (PROTOCOL.md §6.8), as a real client's would."""
        plan, bandwidth_bps = action.plan, action.bandwidth_bps
        spec = self.model.input_spec
        pixels = input_pixels(frame.image, spec)
        x = spec.preprocess(torch.from_numpy(pixels))
        t0 = time.perf_counter()
        out = self._run_range(x, 0, plan.split, plan)
        stages_ms = (time.perf_counter() - t0) * 1e3
        if out.answer is not None:
            return HeadOutput(self._exit(out.answer), None, None, stages_ms, out.stop, 0.0)
        assert out.activation is not None
        packed = None
        pack_ms = 0.0
        if action.pack:
            t1 = time.perf_counter()
            zstd = ZSTD_MODES[self.config.link.zstd]
            if plan.split == 0 and action.pixels:
                packed = pack(pixels[None], IMAGE_CODEC, zstd, bandwidth_bps)
            elif action.codec == LOSSY_CODEC:
                packed = self._pack_lossy(out.activation.numpy(), plan.bits, zstd, bandwidth_bps)
            else:
                packed = pack(
                    out.activation.numpy(),
                    action.codec,
                    zstd,
                    bandwidth_bps,
                    dictionaries=self.dictionaries,
                    table=plan.split,
                )
            pack_ms = (time.perf_counter() - t1) * 1e3
        return HeadOutput(None, out.activation, packed, stages_ms, out.stop, pack_ms)

    def _load_dictionaries(self) -> ZstdDictionaries | None:
        """The dictionaries beside the checkpoint when the codec wants them, else None."""
        if self.config.link.codec != DICT_CODEC:
            return None
        from spinn.model.zdict_file import dictionaries_path, load_dictionaries

        try:
            found = load_dictionaries(
                self.config.compute.checkpoint, self.meta.model_id, self.model.num_stages
            )
        except DictionaryError as exc:
            raise DeviceError(
                f"link.codec {DICT_CODEC}: {exc} (or pack without it: link.codec sparse_int8)"
            ) from None
        if found is None:
            log.info(
                "no %s (make it with `spinn dictionaries`): packing with sparse_int8",
                dictionaries_path(self.config.compute.checkpoint),
            )
        return found

    def _pack_lossy(
        self, activation: Any, bits: int | None, zstd: bool | None, bandwidth_bps: float
    ) -> PackedTensor:
        """sparse_uintb at the decision's width (PROTOCOL.md §6.9); sparse_int8 for a
        lossless decision, or for a tensor the codec cannot carry (a negative value)."""
        if bits is not None:
            try:
                return pack(activation, LOSSY_CODEC, zstd, bandwidth_bps, bits=bits)
            except ValueError:
                pass
        return pack(activation, "sparse_int8", zstd, bandwidth_bps)
