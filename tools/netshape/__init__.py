"""netshape: a TCP proxy that shapes bandwidth, delay, jitter, loss and outages on loopback.

Library use (docs/NETSHAPE.md)::

    async with NetShape(ShapeConfig(up=DirectionConfig(rate_bps=5e6, delay_s=0.02)),
                        upstream=("127.0.0.1", server_port)) as proxy:
        ...connect to proxy.address...
        proxy.update("down", rate_bps="1mbit")
        await proxy.outage("reset")
        print(proxy.stats())
"""

from tools.netshape.config import (
    DirectionConfig,
    OutageSpec,
    ShapeConfig,
    parse_outage_spec,
)
from tools.netshape.control import send_command, start_control
from tools.netshape.proxy import NetShape, run
from tools.netshape.trace import Trace, TracePoint, load_trace

__all__ = [
    "DirectionConfig",
    "NetShape",
    "OutageSpec",
    "ShapeConfig",
    "Trace",
    "TracePoint",
    "load_trace",
    "parse_outage_spec",
    "run",
    "send_command",
    "start_control",
]
