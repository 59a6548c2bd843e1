"""Runtime control of a NetShape proxy: JSON lines on a loopback TCP port.

Each request is one JSON object on one line; each answer is one JSON object on one line,
``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}`` (docs/NETSHAPE.md, "Control"):

* ``{"cmd": "stats"}`` -> ``{"ok": true, "stats": {...}}``
* ``{"cmd": "config"}`` -> ``{"ok": true, "config": {...}}``
* ``{"cmd": "set", "direction": "up"|"down"|"both", "rate_bps": "5mbit", "delay_s": "40ms"}``
  (any DirectionConfig field; numbers in base units or strings with units)
* ``{"cmd": "outage", "mode": "blackhole"|"reset"|"refuse", "duration_s": "5s"}``
  (``duration_s`` optional: without it the outage lasts until ``restore``)
* ``{"cmd": "restore"}``
* ``{"cmd": "help"}``

A bad request gets an error answer and the connection stays usable; a line longer than
64 KiB closes the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from tools.netshape.proxy import NetShape
from tools.netshape.units import parse_duration

__all__ = ["COMMANDS", "MAX_LINE", "handle_command", "send_command", "start_control"]

log = logging.getLogger("netshape.control")

MAX_LINE = 64 * 1024
COMMANDS: dict[str, str] = {
    "stats": "counters per direction, connections and outages",
    "config": "the configuration in force",
    "set": "change direction settings: direction=up|down|both plus DirectionConfig fields",
    "outage": "start an outage: mode=blackhole|reset|refuse, optional duration_s",
    "restore": "end the current outage",
    "help": "this list",
}


async def handle_command(proxy: NetShape, message: Any) -> dict[str, Any]:
    """Carry out one control request and return its answer (never raises for bad input)."""
    if not isinstance(message, dict):
        return {"ok": False, "error": "a request must be a JSON object"}
    cmd = message.get("cmd")
    args = {k: v for k, v in message.items() if k != "cmd"}
    try:
        if cmd == "stats":
            return {"ok": True, "stats": proxy.stats()}
        if cmd == "config":
            return {"ok": True, "config": proxy.config.to_dict()}
        if cmd == "help":
            return {"ok": True, "commands": COMMANDS}
        if cmd == "set":
            direction = args.pop("direction", "both")
            if not isinstance(direction, str):
                raise ValueError("direction must be 'up', 'down' or 'both'")
            if not args:
                raise ValueError("set needs at least one DirectionConfig field")
            config = proxy.update(direction, **args)
            return {"ok": True, "config": config.to_dict()}
        if cmd == "outage":
            mode = args.pop("mode", "blackhole")
            duration = args.pop("duration_s", None)
            if args:
                raise ValueError(f"unknown outage argument(s): {', '.join(sorted(args))}")
            if not isinstance(mode, str):
                raise ValueError("mode must be a string")
            await proxy.outage(mode, None if duration is None else parse_duration(duration))
            return {"ok": True, "mode": proxy.outage_mode}
        if cmd == "restore":
            await proxy.restore()
            return {"ok": True, "mode": proxy.outage_mode}
    except (ValueError, TypeError) as exc:
        return {"ok": False, "error": str(exc)}
    return {"ok": False, "error": f"unknown cmd {cmd!r} (known: {', '.join(COMMANDS)})"}


async def _serve_client(
    proxy: NetShape, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        while True:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as exc:
                line = exc.partial
                if not line.strip():
                    return
            except asyncio.LimitOverrunError:
                answer = {"ok": False, "error": f"request line longer than {MAX_LINE} bytes"}
                writer.write(json.dumps(answer).encode() + b"\n")
                return
            if not line.strip():
                continue
            try:
                message = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                answer = {"ok": False, "error": f"bad JSON: {exc}"}
            else:
                answer = await handle_command(proxy, message)
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
            if reader.at_eof():
                return
    except ConnectionError as exc:
        log.debug("control client: %r", exc)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def start_control(proxy: NetShape, host: str, port: int) -> asyncio.Server:
    """Listen for control clients on ``host:port`` (use loopback: there is no authentication)."""

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _serve_client(proxy, reader, writer)

    return await asyncio.start_server(on_client, host, port, limit=MAX_LINE, reuse_address=True)


async def send_command(
    address: tuple[str, int], message: dict[str, Any], timeout_s: float = 5.0
) -> dict[str, Any]:
    """Send one request to a control port and return the answer (a convenience client)."""

    async def exchange() -> dict[str, Any]:
        reader, writer = await asyncio.open_connection(*address, limit=MAX_LINE)
        try:
            writer.write(json.dumps(message).encode() + b"\n")
            await writer.drain()
            line = await reader.readline()
        finally:
            writer.close()
        if not line:
            raise ConnectionError(f"control port {address[0]}:{address[1]} closed without answer")
        answer = json.loads(line)
        if not isinstance(answer, dict):
            raise ValueError(f"control port answered a non-object: {line!r}")
        return answer

    return await asyncio.wait_for(exchange(), timeout_s)
