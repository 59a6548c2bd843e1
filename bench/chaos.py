"""Soak under hostile load: good devices stream through outages while others attack.

``python -m bench.chaos [--seconds 120] [--devices 3] [--rate 20]``

Two runs of ``--seconds`` each, on loopback, with real processes: a server
(``spinn_server.py``, default limits), ``--devices`` well-behaved devices
(``spinn_device.py``) streaming real Fashion-MNIST frames, every frame offloaded
(``--thr 1.0 --no-continue``), through a netshape proxy that replays a trace with outages
(24 Mbit/s, 20 ms; a 3 s black hole at 20% of the run, a reset at 40%, 2 s of refused
connections at 75%). The run's clock, and the trace, start once every device answers
frames. Halfway through each run the server is killed (SIGKILL) and restarted on the same
port 2 s later.

The first run is quiet; in the second, hostile clients hit the same server directly
(docs/RUNTIME.md, "Hostile peers"): handshake hoarders holding silent connections,
reconnect loops, PING, CANCEL and INFER floods that never read their answers, slow-loris
peers before and after HELLO, oversized length prefixes, and malformed frames (mutations
of a valid session). Each reconnects whenever it is closed.

Figures (the last line is one JSON object): ``frames_lost`` and ``frames_duplicated`` over
the good devices (must be 0); ``served_share_good_devices``: the share of their frames the
server answered, hostile run over quiet run (target ≥ 0.9: the outages and the restart are
the same in both, so the ratio is what the attackers cost); ``p95_latency_ratio_good_devices``
(hostile p95 over quiet p95, target ≤ 2); ``server_rss_growth_mb`` (the largest growth of a
server process's resident memory during the hostile run, from 3 s after its start);
``shed_connections`` (connections the server shed from its full handshake pool or closed
to make room in it: ``handshakes_shed`` + ``handshakes_evicted``) and the attackers'
connection counts. A missed target is printed as it is.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._common import ROOT
from spinn.runtime.processes import free_port, stop_process, wait_listening
from spinn.runtime.run_summary import percentile

__all__ = ["Attack", "main", "run_phase"]

_RESTART_GAP_S = 2.0
"""Seconds the server stays dead after the SIGKILL."""


# -- the hostile clients --------------------------------------------------------------------


@dataclass
class Attack:
    """Frames and counters of the hostile clients (they run in this process's event loop)."""

    port: int
    hello: bytes
    infer: bytes
    session: bytes
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    connections: Counter[str] = field(default_factory=Counter)

    async def _open(self, kind: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        while not self.stop.is_set():
            try:
                pair = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), 2.0)
            except (OSError, TimeoutError):
                await asyncio.sleep(0.1)  # the server is down (killed): try again
                continue
            self.connections[kind] += 1
            return pair
        raise asyncio.CancelledError

    async def _loop(self, kind: str, body: Any) -> None:
        """Run ``body(reader, writer)`` on a fresh connection, again and again."""
        while not self.stop.is_set():
            try:
                reader, writer = await self._open(kind)
            except asyncio.CancelledError:
                return
            try:
                await body(reader, writer)
            except (OSError, TimeoutError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.wait_closed(), 0.5)

    async def _until_closed(self, reader: asyncio.StreamReader, limit_s: float = 30.0) -> None:
        with contextlib.suppress(TimeoutError):
            end = time.monotonic() + limit_s
            while not self.stop.is_set() and time.monotonic() < end:
                if not await asyncio.wait_for(
                    reader.read(1 << 16), max(0.01, end - time.monotonic())
                ):
                    return

    async def hoard(self, reader: asyncio.StreamReader, _w: asyncio.StreamWriter) -> None:
        await self._until_closed(reader)  # says nothing, holds the slot until closed

    async def reconnect(self, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(self.hello)
        await asyncio.wait_for(reader.read(1 << 16), 2.0)  # WELCOME, then straight away out

    async def _flood(self, w: asyncio.StreamWriter, chunk: bytes) -> None:
        # Never reads: what the server answers piles up until it stops reading us.
        w.write(self.hello)
        while not self.stop.is_set():
            w.write(chunk)
            await asyncio.wait_for(w.drain(), 5.0)
            await asyncio.sleep(0)

    async def ping_flood(self, _r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        from protocol import Ping
        from protocol.framing import encode_frame
        from protocol.messages import encode_message

        chunk = b"".join(encode_frame(encode_message(Ping(i, 0.0))) for i in range(500))
        await self._flood(w, chunk)

    async def cancel_flood(self, _r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        from protocol import Cancel
        from protocol.framing import encode_frame
        from protocol.messages import encode_message

        chunk = b"".join(encode_frame(encode_message(Cancel(10**9 + i))) for i in range(500))
        await self._flood(w, chunk)

    async def infer_flood(self, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        # The same request id over and over: after the first, each is a protocol error, so
        # a new id per INFER would be the stronger attack; ids are rewritten below.
        import msgpack

        from protocol import Infer
        from protocol.framing import encode_frame
        from protocol.messages import decode_message, encode_message

        template = decode_message(msgpack.unpackb(self.infer[4:], raw=False))
        assert isinstance(template, Infer)
        w.write(self.hello)
        rid = 0
        while not self.stop.is_set():
            batch = []
            for _ in range(64):
                rid += 1
                batch.append(
                    encode_frame(
                        encode_message(
                            Infer(rid, template.split, template.thr_conf, template.tensor)
                        )
                    )
                )
            w.write(b"".join(batch))
            await asyncio.wait_for(w.drain(), 5.0)
            await asyncio.sleep(0)

    async def _trickle(
        self, reader: asyncio.StreamReader, w: asyncio.StreamWriter, data: bytes
    ) -> None:
        """Slow loris: ``data`` a byte every half second, until the server closes."""
        for byte in data:
            if self.stop.is_set() or reader.at_eof():
                return
            w.write(bytes([byte]))
            await asyncio.wait_for(w.drain(), 5.0)
            await asyncio.sleep(0.5)

    async def loris_before(self, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await self._trickle(reader, w, self.hello)

    async def loris_after(self, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(self.hello)
        await asyncio.wait_for(reader.read(1 << 16), 5.0)
        await self._trickle(reader, w, self.infer)

    async def oversized(self, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write((0xFFFFFFF0).to_bytes(4, "big") + b"\0" * 4096)
        await self._until_closed(reader, 5.0)

    async def malformed(self, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        from bench.fuzz import mutate

        rng = random.Random(self.connections["malformed"])
        w.write(mutate(self.session, rng, rng.randint(1, 8)))
        await self._until_closed(reader, 5.0)

    async def run(self, hoarders: int) -> None:
        kinds: list[tuple[str, Any, int]] = [
            ("hoard", self.hoard, hoarders),
            ("reconnect", self.reconnect, 2),
            ("ping_flood", self.ping_flood, 1),
            ("cancel_flood", self.cancel_flood, 1),
            ("infer_flood", self.infer_flood, 1),
            ("loris_before", self.loris_before, 4),
            ("loris_after", self.loris_after, 4),
            ("oversized", self.oversized, 1),
            ("malformed", self.malformed, 2),
        ]
        tasks = [
            asyncio.create_task(self._loop(kind, body)) for kind, body, n in kinds for _ in range(n)
        ]
        await self.stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _frames(checkpoint: Path) -> tuple[bytes, bytes, bytes]:
    """HELLO, one INFER and a short valid session for ``checkpoint``'s model."""
    import numpy as np

    from protocol import PROTOCOL_VERSION, Bye, Hello, Infer, Ping, pack
    from protocol.framing import encode_frame
    from protocol.messages import encode_message
    from spinn.model.checkpoint import load_checkpoint

    model, meta = load_checkpoint(checkpoint)
    hello = encode_frame(
        encode_message(
            Hello(PROTOCOL_VERSION, meta.model_id, meta.weights_sha256, ("sparse_int8",))
        )
    )
    x = np.maximum(np.random.default_rng(0).standard_normal((1, *model.split_shape(2))), 0)
    infer = encode_frame(
        encode_message(Infer(1, 2, 1.0, pack(x.astype(np.float32), "sparse_int8")))
    )
    ping = encode_frame(encode_message(Ping(1, 0.0, b"\0" * 64)))
    return hello, infer, hello + infer + ping + encode_frame(encode_message(Bye()))


# -- one run --------------------------------------------------------------------------------


def _rss_mb(pid: int) -> float | None:
    import psutil

    try:
        return float(psutil.Process(pid).memory_info().rss) / 2**20
    except psutil.Error:
        return None


class _Server:
    def __init__(self, checkpoint: Path, port: int, log: Path) -> None:
        self.log = log
        self._fh = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "spinn_server.py"), "--checkpoint", str(checkpoint),
             "--port", str(port), "--stats-interval", "1"],
            stdout=self._fh, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip
        wait_listening(port, self.proc, 120.0)
        self.started = time.monotonic()
        self.rss: list[tuple[float, float]] = []

    def sample(self) -> None:
        rss = _rss_mb(self.proc.pid)
        if rss is not None:
            self.rss.append((time.monotonic() - self.started, rss))

    def rss_growth_mb(self) -> float:
        settled = [mb for t, mb in self.rss if t >= 3.0]
        return max(settled) - settled[0] if settled else 0.0

    def stop(self, sig: int) -> None:
        stop_process(self.proc, 30.0, sig)
        self._fh.close()

    def shed(self) -> dict[str, int]:
        """Connections shed from the full handshake pool and closed to make room in it,
        from the final stats, or the last stats line of a killed server."""
        text = self.log.read_text(errors="replace")
        final = re.findall(r"final stats (\{.*\})", text)
        if final:
            stats = json.loads(final[-1])
            return {k: int(stats.get(f"handshakes_{k}", 0)) for k in ("shed", "evicted")}
        out = {}
        for key in ("shed", "evicted"):
            counts = re.findall(rf" {key}=(\d+)", text)
            out[key] = int(counts[-1]) if counts else 0
        return out


def _device(
    port: int, checkpoint: Path, rate: float, out: Path, seed: int
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "spinn_device.py"), "--checkpoint", str(checkpoint),
         "--server", f"127.0.0.1:{port}", "--dataset", "fashion-mnist:test", "--rate", str(rate),
         "--split", "2", "--thr", "1.0", "--no-continue", "--no-status", "--seed", str(seed),
         "--out", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip


def _trace(path: Path, seconds: float) -> Path:
    """The run's netshape trace: the same outages at the same moments of every run."""
    rows = [(0.0, ""), (0.2 * seconds, "blackhole"), (0.2 * seconds + 3.0, ""),
            (0.4 * seconds, "reset"), (0.4 * seconds + 1.0, ""),
            (0.75 * seconds, "refuse"), (0.75 * seconds + 2.0, ""), (seconds + 60.0, "")]  # fmt: skip
    lines = ["time,up_rate,down_rate,delay,loss,outage"]
    lines += [f"{t:.3f},24mbit,24mbit,20ms,0,{mode}" for t, mode in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def _wait_answering(outs: list[Path], procs: list[subprocess.Popen[str]], limit_s: float) -> None:
    """Until every device has answered a frame (models load slowly on a busy machine)."""
    end = time.monotonic() + limit_s
    while not all(out.exists() and out.stat().st_size > 0 for out in outs):
        if any(proc.poll() is not None for proc in procs):
            raise RuntimeError("a device ended before it answered a frame")
        if time.monotonic() > end:
            raise RuntimeError(f"the devices did not answer within {limit_s:g} s")
        time.sleep(0.2)


def run_phase(
    checkpoint: Path, seconds: float, devices: int, rate: float, hostile: bool, hoarders: int,
    workdir: Path,
) -> dict[str, Any]:  # fmt: skip
    """One run; figures of the good devices, the server and (if hostile) the attackers."""
    name = "hostile" if hostile else "quiet"
    server_port, proxy_port, control = free_port(), free_port(), free_port()
    servers = [_Server(checkpoint, server_port, workdir / f"{name}-server-0.log")]
    outs = [workdir / f"{name}-device-{i}.jsonl" for i in range(devices)]
    procs = [_device(proxy_port, checkpoint, rate, out, i) for i, out in enumerate(outs)]
    # The devices answer locally until the proxy is up; the trace starts with the run.
    _wait_answering(outs, procs, 300.0)
    trace = _trace(workdir / f"{name}-trace.csv", seconds)
    proxy = subprocess.Popen(
        [sys.executable, "-m", "tools.netshape", "--listen", f"127.0.0.1:{proxy_port}",
         "--upstream", f"127.0.0.1:{server_port}", "--control", f"127.0.0.1:{control}",
         "--trace", str(trace), "--seed", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
    )  # fmt: skip
    wait_listening(proxy_port, proxy, 60.0)
    attack: Attack | None = None
    loop = asyncio.new_event_loop()
    thread: threading.Thread | None = None
    if hostile:
        hello, infer, session = _frames(checkpoint)
        attack = Attack(server_port, hello, infer, session)

        def attack_thread() -> None:
            assert attack is not None
            asyncio.set_event_loop(loop)
            attack.stop = asyncio.Event()
            loop.run_until_complete(attack.run(hoarders))

        thread = threading.Thread(target=attack_thread, daemon=True)
    start = time.monotonic()
    # Answers before the run's clock started were local (no proxy yet): not measured.
    before = [len(out.read_text().splitlines()) for out in outs]
    killed = False
    try:
        if thread is not None:
            time.sleep(2.0)  # the good devices connect first, as in a live stream
            thread.start()
        while (elapsed := time.monotonic() - start) < seconds:
            servers[-1].sample()
            if not killed and elapsed >= seconds / 2:
                servers[-1].stop(signal.SIGKILL)
                time.sleep(_RESTART_GAP_S)
                servers.append(_Server(checkpoint, server_port, workdir / f"{name}-server-1.log"))
                killed = True
            time.sleep(0.5)
    finally:
        if attack is not None and thread is not None and thread.is_alive():
            loop.call_soon_threadsafe(attack.stop.set)
            thread.join(30)
        summaries = []
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                _, err = proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            match = re.search(r"^summary (\{.*\})$", err or "", re.MULTILINE)
            summaries.append(
                json.loads(match.group(1)) if match else {"error": (err or "")[-2000:]}
            )
        stop_process(proxy)
        for server in servers:
            server.stop(signal.SIGTERM)
    records = [[json.loads(line) for line in out.read_text().splitlines() if line.strip()]
               for out in outs]  # fmt: skip
    lost = duplicated = frames = served = read_total = 0
    latencies: list[float] = []
    for summary, recs, skip in zip(summaries, records, before, strict=True):
        ids = Counter(r["frame"] for r in recs)
        read = int(summary.get("frames_read", len(ids)))
        read_total += read
        lost += read - len(ids)
        duplicated += sum(n - 1 for n in ids.values())
        measured = recs[skip:]
        frames += len(measured)
        served += sum(1 for r in measured if r["where"] == "server")
        latencies += [float(r["latency_ms"]) for r in measured]
    measured_by = Counter(r["where"] for recs, skip in zip(records, before, strict=True)
                          for r in recs[skip:])  # fmt: skip
    result: dict[str, Any] = {
        "frames_read": read_total,
        "frames": frames,
        "frames_lost": lost,
        "frames_duplicated": duplicated,
        "served_by_server": served,
        "served_share": round(served / frames, 4) if frames else 0.0,
        "p95_latency_ms": round(percentile(latencies, 95), 3) if latencies else None,
        "p50_latency_ms": round(percentile(latencies, 50), 3) if latencies else None,
        "answered_by": dict(measured_by),
        "server_rss_growth_mb": round(max(s.rss_growth_mb() for s in servers), 1),
        "server_rss_mb_max": round(max((mb for s in servers for _, mb in s.rss), default=0), 1),
        "shed_connections": sum(s.shed()["shed"] + s.shed()["evicted"] for s in servers),
        "handshakes_shed": sum(s.shed()["shed"] for s in servers),
        "handshakes_evicted": sum(s.shed()["evicted"] for s in servers),
        "device_errors": [s["error"] for s in summaries if "error" in s],
    }
    if attack is not None:
        result["attack_connections"] = dict(attack.connections)
    loop.close()
    return result


def main(argv: list[str] | None = None) -> int:
    from spinn.pretrained import DEFAULT_CHECKPOINT

    p = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__)
    p.add_argument("--seconds", type=float, default=120.0, help="length of each run (2 runs)")
    p.add_argument("--devices", type=int, default=3, help="well-behaved devices")
    p.add_argument("--rate", type=float, default=20.0, help="frames a second per device")
    p.add_argument("--hoarders", type=int, default=300, help="silent connections held open")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="spinn-chaos-") as tmp:
        workdir = Path(tmp)
        phases = {}
        for hostile in (False, True):
            name = "hostile" if hostile else "quiet"
            print(f"{name} run: {args.seconds:.0f} s, {args.devices} devices at {args.rate:g} fps",
                  flush=True)  # fmt: skip
            phases[name] = run_phase(args.checkpoint, args.seconds, args.devices, args.rate,
                                     hostile, args.hoarders, workdir)  # fmt: skip
            for key, value in phases[name].items():
                print(f"  {key}: {value}", flush=True)
    quiet, hostile_run = phases["quiet"], phases["hostile"]
    share = hostile_run["served_share"] / quiet["served_share"] if quiet["served_share"] else 0.0
    p95_q, p95_h = quiet["p95_latency_ms"], hostile_run["p95_latency_ms"]
    figures = {
        "frames_lost": quiet["frames_lost"] + hostile_run["frames_lost"],
        "frames_duplicated": quiet["frames_duplicated"] + hostile_run["frames_duplicated"],
        "served_share_good_devices": round(share, 4),
        "served_share_quiet": quiet["served_share"],
        "served_share_hostile": hostile_run["served_share"],
        "p95_latency_ratio_good_devices": round(p95_h / p95_q, 3) if p95_q and p95_h else None,
        "p95_latency_ms_quiet": p95_q,
        "p95_latency_ms_hostile": p95_h,
        "server_rss_growth_mb": hostile_run["server_rss_growth_mb"],
        "shed_connections": hostile_run["shed_connections"],
        "handshakes_shed": hostile_run["handshakes_shed"],
        "handshakes_evicted": hostile_run["handshakes_evicted"],
        "attack_connections": sum(hostile_run.get("attack_connections", {}).values()),
        "frames_good_devices": quiet["frames"] + hostile_run["frames"],
        "seconds_per_run": args.seconds,
        "devices": args.devices,
    }
    print(json.dumps(figures))
    ok = figures["frames_lost"] == 0 and figures["frames_duplicated"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
