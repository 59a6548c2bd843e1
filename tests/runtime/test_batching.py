"""Dynamic batching (spinn.runtime.batching) and the server's batched path.

Batched answers must equal unbatched ones (exit and probabilities, assert_close), each
sample decided against its own threshold; cancelled requests never run or stop at a
stage boundary; the batcher forms batches per split while workers are busy.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from protocol import Cancel, Error, ErrorCode, Infer, Result, pack
from spinn.model.checkpoint import load_checkpoint
from spinn.model.exits import ExitRule
from spinn.model.inference import run_stages
from spinn.model.progressive import ProgressiveModel
from spinn.runtime.accel import resolve_device
from spinn.runtime.batching import run_batch, to_device
from spinn.runtime.config import ConfigError, ServerComputeConfig
from spinn.runtime.server import SpinnServer
from tests.support.runtime import RawClient, hello, serve

pytestmark = pytest.mark.timeout(60)


def _activations(model: torch.nn.Module, split: int, n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(1, 1, 28, 28, generator=g) for _ in range(n)]
    acts = [run_stages(model, x, 0, split, ExitRule(None)).activation for x in xs]
    return [a for a in acts if a is not None]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_batched_answers_equal_unbatched_at_several_splits(checkpoint: Path, device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here: the CUDA branch runs where one is available")
    model, _ = load_checkpoint(checkpoint)
    model.eval()
    dev = resolve_device(device)
    model.to(dev)
    # Mixed thresholds: some samples leave at early exits, others run to the final one.
    rules = [ExitRule(t) for t in (0.0, 0.15, 0.3, 1.0, 0.12, 0.5, None, 0.2)]
    exits_seen = set()
    # Server-only, before and after the first early exit, and the last stage alone.
    for split in (0, 2, 6, model.num_stages - 1):
        acts = _activations(model.cpu(), split, len(rules), seed=split)
        model.to(dev)
        x = to_device([a.numpy() for a in acts], dev)
        answers = run_batch(model, x, split, rules)
        for act, rule, got in zip(acts, rules, answers, strict=True):
            want = run_stages(model, act.to(dev), split, model.num_stages, rule).answer
            assert got is not None and want is not None
            assert got.exit_index == want.exit, (split, rule)
            torch.testing.assert_close(got.probs, want.probs.cpu(), rtol=1e-4, atol=1e-5)
            assert got.stages_run == want.stage - split + 1
            exits_seen.add(got.exit_index)
    assert len(exits_seen) > 1, "the thresholds exercise several exits"


def test_run_batch_drops_cancelled_samples_at_stage_boundaries(checkpoint: Path) -> None:
    model, _ = load_checkpoint(checkpoint)
    acts = _activations(model.eval(), 0, 4, seed=9)
    x = to_device([a.numpy() for a in acts], torch.device("cpu"))
    asked: list[int] = []

    def cancelled(i: int) -> bool:
        asked.append(i)
        return i == 1 or (i == 3 and asked.count(3) >= 2)

    answers = run_batch(model, x, 0, [ExitRule(None)] * 4, cancelled)  # only the final exit
    assert answers[1] is None and answers[3] is None
    assert answers[0] is not None and answers[2] is not None
    assert asked.count(1) == 1 and asked.count(3) == 2, "stopped at the next boundary"
    with pytest.raises(ValueError, match="batch of 4 activations but 1 exit rules"):
        run_batch(model, x, 0, [ExitRule(0.5)])


def _count_exit_head_calls(model: ProgressiveModel) -> list[int]:
    """Calls per early-exit head from now on (forward hooks on ``model.exit_heads``)."""
    calls = [0] * len(model.exit_heads)
    for e, head in enumerate(model.exit_heads):
        head.register_forward_hook(lambda *_, e=e: calls.__setitem__(e, calls[e] + 1))
    return calls


@pytest.mark.parametrize(
    ("thrs", "heads_run"),  # heads_run: the first heads that run; None: all of them
    [
        # No sample can leave early: no early-exit head runs, only the final exit answers.
        ([None, None, None], 0),
        # The sample with threshold 0 leaves at the first exit; the rest cannot leave early.
        ([None, 0.0, None], 1),
        # A softmax can reach 1.0 exactly, so threshold 1 keeps every head running.
        ([1.0, None], None),
    ],
)
def test_run_batch_skips_exit_heads_no_sample_can_leave_at(
    checkpoint: Path, thrs: list[float | None], heads_run: int | None
) -> None:
    model, _ = load_checkpoint(checkpoint)
    model.eval()
    acts = _activations(model, 0, len(thrs), seed=11)
    calls = _count_exit_head_calls(model)
    rules = [ExitRule(t) for t in thrs]
    answers = run_batch(model, to_device([a.numpy() for a in acts], torch.device("cpu")), 0, rules)
    ran = len(calls) if heads_run is None else heads_run
    assert calls == [1] * ran + [0] * (len(calls) - ran), "the first heads ran, once each"
    for act, rule, got in zip(acts, rules, answers, strict=True):
        want = run_stages(model, act, 0, model.num_stages, rule).answer
        assert got is not None and want is not None
        assert got.exit_index == want.exit and got.stages_run == want.stage + 1
        torch.testing.assert_close(got.probs, want.probs, rtol=1e-4, atol=1e-5)


def test_server_batch_without_early_exits_runs_no_exit_head(checkpoint: Path) -> None:
    model, _ = load_checkpoint(checkpoint)
    model.eval()
    acts = _activations(model, 0, 3, seed=12)
    results: dict[int, Result] = {}
    calls: list[list[int]] = []

    async def body(server: SpinnServer, port: int) -> None:
        calls.append(_count_exit_head_calls(server.model))
        client = await RawClient.open(port)
        await hello(client, server)
        # Threshold 0 would answer at the first exit, were early exits not off.
        client.send(*(Infer(i, 0, 0.0, pack(a.numpy(), "float32"), early_exits=False)
                      for i, a in enumerate(acts)))  # fmt: skip
        for _ in acts:
            event = await client.next()
            assert isinstance(event, Result), event
            results[event.request_id] = event
        client.close()

    server = serve(checkpoint, body, workers=1, batch_max=4, batch_wait_ms=300, top_k=3)
    batch = server.metrics.batch_size.collect()[0]
    count = next(s.value for s in batch.samples if s.name.endswith("_count"))
    total = next(s.value for s in batch.samples if s.name.endswith("_sum"))
    assert count == 1 and total == len(acts), "the three requests in one forward pass"
    assert calls == [[0] * (model.num_exits - 1)], "no early-exit head ran"
    for i, act in enumerate(acts):
        want = run_stages(model, act, 0, model.num_stages, ExitRule(None)).answer
        assert want is not None and results[i].exit_index == want.exit == model.num_exits - 1
        assert results[i].classes == tuple(c for c, _ in want.topk(3))


def test_server_batches_devices_equal_unbatched_and_honours_cancel(checkpoint: Path) -> None:
    model, _ = load_checkpoint(checkpoint)
    model.eval()
    split, thr = 2, 0.3
    acts = _activations(model, split, 6, seed=4)
    got: dict[tuple[int, int], object] = {}

    async def body(server: SpinnServer, port: int) -> None:
        clients = [await RawClient.open(port) for _ in range(2)]
        for c in clients:
            await hello(c, server)
        for n, c in enumerate(clients):
            c.send(*(Infer(i, split, thr, pack(a.numpy(), "float32"))
                     for i, a in enumerate(acts[n * 3 : n * 3 + 3])))  # fmt: skip
        clients[1].send(Cancel(1))  # still waiting for its batch: removed, never run
        for n, c in enumerate(clients):
            for _ in range(3):
                event = await c.next()
                got[n, getattr(event, "request_id", -1)] = event
            c.close()

    # A long wait with one worker: both devices' requests meet in one batch.
    server = serve(checkpoint, body, workers=1, batch_max=8, batch_wait_ms=300, top_k=3)
    cancelled = got.pop((1, 1))
    assert isinstance(cancelled, Error) and cancelled.code is ErrorCode.CANCELLED
    assert server.stats.cancelled_queued == 1 and server.stats.computed == 5
    for (n, rid), event in got.items():
        want = run_stages(model, acts[n * 3 + rid], split, model.num_stages, ExitRule(thr)).answer
        assert isinstance(event, Result) and want is not None
        assert event.exit_index == want.exit
        assert event.classes == tuple(c for c, _ in want.topk(3))
        torch.testing.assert_close(
            torch.tensor(event.probs),
            torch.tensor([p for _, p in want.topk(3)]),
            atol=1e-5,
            rtol=1e-4,
        )
    batch = server.metrics.batch_size.collect()[0]
    count = next(s.value for s in batch.samples if s.name.endswith("_count"))
    total = next(s.value for s in batch.samples if s.name.endswith("_sum"))
    assert count == 1 and total == 5, "five requests from two devices in one forward pass"


def test_batching_and_device_flags_are_checked() -> None:
    assert ServerComputeConfig().batch_max == 1 and ServerComputeConfig().device == "auto"
    with pytest.raises(ConfigError, match=r"^compute\.batch_max must be in 1\.\.1024, got 0"):
        ServerComputeConfig(batch_max=0)
    with pytest.raises(ConfigError, match=r"^compute\.batch_wait_ms must be in \[0, 1000\]"):
        ServerComputeConfig(batch_wait_ms=-1)
    for bad in ("tpu", "cuda:abc", "cuda:", "cuda:-1"):
        with pytest.raises(ConfigError, match=f"^compute.device: unknown '{bad}'"):
            ServerComputeConfig(device=bad)
        with pytest.raises(ValueError, match="cuda:N"):
            resolve_device(bad)
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_server_cli_fills_batching_device_and_metrics_fields() -> None:
    import spinn_server

    parser = spinn_server.build_parser()
    args = parser.parse_args(["--batch-max", "16", "--batch-wait-ms", "0.5", "--device", "cpu",
                              "--metrics-port", "9100"])  # fmt: skip
    config = spinn_server.config_from_args(args)
    assert (config.compute.batch_max, config.compute.batch_wait_ms, config.compute.device) == (
        16,
        0.5,
        "cpu",
    )
    assert (config.operations.metrics_port, config.operations.metrics_host) == (9100, "127.0.0.1")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as exc:
            spinn_server.main(["--device", "cuda"])
        assert exc.value.code == 2
