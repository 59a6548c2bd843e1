"""End to end with real processes on loopback, tests (1)–(5).

Server, device and (for (3)) the netshape proxy run as separate processes, as
they would on separate machines; the tests read the device's JSON lines and
summary and the server's final stats line.  They use the shipped model.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from spinn.model.checkpoint import load_checkpoint
from spinn.model.exits import ExitRule
from spinn.model.inference import run_stages
from spinn.offline.data import load_fashion_mnist
from spinn.runtime.processes import free_port
from tests.support.runtime import (
    CHECKPOINT,
    Device,
    Server,
    by_frame,
    netshape_control,
    netshape_process,
    stop_all,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def model_info() -> tuple[Any, Any]:
    # One intra-op thread: batch-1 inference with two threads on two busy cores is
    # many times slower (the threads wait on each other), and the processes need them.
    torch.set_num_threads(1)
    return load_checkpoint(CHECKPOINT)


def test_1_every_frame_once_and_accuracy_matches_offline(
    tmp_path: Path, model_info: tuple[Any, Any]
) -> None:
    model, _ = model_info
    n, split, thr = 300, model.num_stages // 2, 0.8
    port = free_port()
    server = Server(tmp_path, port)
    device = Device(port, "--limit", str(n), "--split", str(split), "--thr", str(thr))
    try:
        summary = device.finish()
    finally:
        device.kill()
        assert server.stop(signal.SIGINT) == 0
    records = by_frame(device.records, n)
    assert {r["where"] for r in records} <= {"device", "server"}
    assert summary["answered_by"]["server"] > 0

    # Offline: the same images, the same split and threshold, one process, no network.
    data = load_fashion_mnist("test").head(n)
    offline = []
    for i in range(n):
        x = model.input_spec.preprocess(data.images[i])
        out = run_stages(model, x, 0, model.num_stages, ExitRule(thr))
        offline.append(out.answer.label)
    labels = data.labels.tolist()
    offline_acc = sum(p == y for p, y in zip(offline, labels, strict=True)) / n
    agree = sum(r["class"] == p for r, p in zip(records, offline, strict=True)) / n
    # The int8 packing of the activation may flip a borderline input; nothing more.
    assert agree >= 0.97, agree
    assert summary["accuracy"] == pytest.approx(offline_acc, abs=0.01)
    assert all(r["label"] == y for r, y in zip(records, labels, strict=True))


def test_2_server_killed_mid_stream_then_restarted(tmp_path: Path) -> None:
    port = free_port()
    server = Server(tmp_path, port)
    device = Device(port, "--limit", "5000", "--rate", "50", "--split", "2", "--thr", "1.0",
                    "--no-continue")  # fmt: skip
    try:
        device.wait_for(lambda rs: sum(r["where"] == "server" for r in rs) >= 40)
        server.stop(signal.SIGKILL)
        device.wait_for(lambda rs: sum(r["where"] == "fallback" for r in rs) >= 20)
        restarted_at = len(device.records)
        server = Server(tmp_path, port)
        device.wait_for(lambda rs: sum(r["where"] == "server" for r in rs[restarted_at:]) >= 20)
        # SIGINT: stop reading frames, answer those in flight, print the summary, exit 0.
        device.proc.send_signal(signal.SIGINT)
        summary = device.finish()
    finally:
        device.kill()
        server.stop()
    n = summary["frames"]
    assert n < 5000
    records = by_frame(device.records, n)
    wheres = [r["where"] for r in records]
    # In frame order: served, then the outage answered locally, then served again.
    first_fallback = wheres.index("fallback")
    assert wheres[:first_fallback].count("server") >= 30
    assert wheres[first_fallback:].count("server") >= 15, "offload resumed"
    assert summary["server_connects"] == 2
    assert summary["answered_by"]["fallback"] == wheres.count("fallback")


def test_3_outage_through_netshape_falls_back_without_loss(tmp_path: Path) -> None:
    # A blackhole: the connection stays up and silent, the hardest outage to notice
    # (an abrupt loss is test 2's SIGKILL).
    mode = "blackhole"
    server_port, proxy_port, control = free_port(), free_port(), free_port()
    server = Server(tmp_path, server_port)
    proxy = netshape_process(proxy_port, server_port, control)
    device = Device(proxy_port, "--limit", "5000", "--rate", "50", "--split", "3",
                    "--thr", "0.9")  # fmt: skip
    try:
        device.wait_for(lambda rs: sum(r["where"] == "server" for r in rs) >= 30)
        netshape_control(control, {"cmd": "outage", "mode": mode})
        outage_from = len(device.records)
        device.wait_for(lambda rs: sum(r["where"] == "fallback" for r in rs) >= 40)
        netshape_control(control, {"cmd": "restore"})
        outage_to = len(device.records)
        device.wait_for(lambda rs: sum(r["where"] == "server" for r in rs[outage_to:]) >= 10)
        device.proc.send_signal(signal.SIGINT)
        summary = device.finish()
    finally:
        stop_all(device, proxy, server)
    by_frame(device.records, summary["frames"])
    # Answers in arrival order: once the frames in flight at the cut are done, the
    # server answers nothing until the link is restored, and fallbacks fill the gap.
    during = [r["where"] for r in device.records[outage_from + 10 : outage_to]]
    assert "server" not in during, "no server answers while the link is down"
    assert during.count("fallback") >= 30
    assert summary["answered_by"]["fallback"] >= 40


def test_3_low_bandwidth_through_netshape_loses_nothing(tmp_path: Path) -> None:
    n = 150
    server_port, proxy_port, control = free_port(), free_port(), free_port()
    server = Server(tmp_path, server_port)
    proxy = netshape_process(proxy_port, server_port, control)
    device = Device(proxy_port, "--limit", str(n), "--rate", "30", "--split", "1", "--thr", "0.9")
    try:
        device.wait_for(lambda rs: len(rs) >= 30)
        netshape_control(control, {"cmd": "set", "direction": "up", "rate_bps": "200kbit"})
        summary = device.finish()
    finally:
        stop_all(device, proxy, server)
    by_frame(device.records, n)
    # The bandwidth estimate follows the link down from loopback speed.
    assert summary["estimates"]["bandwidth_bps"] < 2e6, summary["estimates"]
    assert summary["frames"] == n


def test_4_inferred_server_time_within_25_percent_of_measured(tmp_path: Path) -> None:
    n = 150
    port = free_port()
    # One worker and a modest rate: no queueing, so the server time the device infers is
    # the compute time plus the hand-offs between event loops and threads.
    server = Server(tmp_path, port, "--no-report-compute", "--workers", "1")
    device = Device(port, "--limit", str(n), "--rate", "25", "--split", "1", "--thr", "1.0",
                    "--no-continue")  # fmt: skip
    try:
        summary = device.finish()
    finally:
        device.kill()
        assert server.stop() == 0
    by_frame(device.records, n)
    stats = server.final_stats()
    # The formula infers the time the server held each request: its compute plus the
    # unpacking and the hand-offs between event loop and worker, which the server measures
    # (held_ms) whether or not it reports it.  Medians: a busy machine adds long-tailed
    # scheduling delays to a few responses.
    measured = stats["held_ms_median"]
    assert measured >= stats["compute_ms_median"]
    inferred = summary["server_time_ms"]["inferred_median"]
    assert summary["server_time_ms"]["reported_mean"] is None
    assert inferred == pytest.approx(measured, rel=0.25), (inferred, measured, summary)


def test_5_cancel_saves_server_work(tmp_path: Path, model_info: tuple[Any, Any]) -> None:
    model, _ = model_info
    n = 150
    port = free_port()
    # One server worker, each stage 30× slower: a request takes the server many times
    # the device's own continuation to the same exit, on an idle or a loaded machine
    # alike (the sleep scales with the measured stage time), so local exits win the races
    # and CANCEL.  A loose deadline keeps the deadline's CANCELs and BUSY out of it.
    server = Server(tmp_path, port, "--workers", "1", "--slowdown", "30")
    device = Device(port, "--limit", str(n), "--split", "1", "--thr", "0.6",
                    "--max-in-flight", "8", "--deadline-factor", "100")  # fmt: skip
    try:
        summary = device.finish()
    finally:
        device.kill()
        assert server.stop() == 0
    by_frame(device.records, n)
    stats = server.final_stats()
    # Every INFER was accepted or refused at once with BUSY (overload).
    assert stats["requests"] + stats["busy_sent"] == summary["offloaded"]
    cancelled = stats["cancelled_queued"] + stats["cancelled_running"]
    assert cancelled > 0 and stats["computed"] < stats["requests"]
    # Some of them after a local exit: a missed deadline's CANCEL alone does not count.
    assert cancelled > summary["deadline_expired"], (stats, summary)
    assert stats["computed"] + cancelled + stats["expired_unrun"] == stats["requests"]
    # Only the device's CANCELs stop requests (an expired deadline is counted apart).
    assert stats["cancels_received"] >= cancelled
