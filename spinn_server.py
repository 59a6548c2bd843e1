"""spinn-server: serve the server part of a progressive model to many devices.

Thin CLI (STYLE.md habit 5): the flags of spinn.runtime.flags.SERVER_FLAGS → ServerConfig →
spinn.runtime.server.run_server.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from spinn.runtime.config import ServerConfig

__all__ = ["build_parser", "config_from_args", "main"]


_DESCRIPTION = (
    "Serve the part of a SPINN progressive model after the split: devices send the "
    "activation at their split (INFER), the server finishes the inference with its own "
    "early exits and answers RESULT. Stops gracefully on SIGINT/SIGTERM."
)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``spinn-server``'s flags (``spinn.runtime.flags.SERVER_FLAGS``)."""
    from spinn.runtime.flags import SERVER_FLAGS

    return SERVER_FLAGS.build_parser("spinn-server", _DESCRIPTION)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig the parsed flags describe."""
    from spinn.runtime.flags import SERVER_FLAGS

    return SERVER_FLAGS.config_from_args(args)  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``spinn-server``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    from spinn.runtime.flags import SERVER_FLAGS

    try:
        config = config_from_args(args)
        from spinn.runtime.accel import resolve_device

        resolve_device(config.compute.device)  # --device cuda without a GPU is a bad flag
    except ValueError as exc:
        parser.error(SERVER_FLAGS.flag_text(str(exc)))
    import uvloop

    from protocol.dictionaries import DictionaryError
    from spinn.model.checkpoint import CheckpointError
    from spinn.runtime.credentials import SecurityError
    from spinn.runtime.server import run_server

    try:
        return uvloop.run(run_server(config))
    except (CheckpointError, DictionaryError, SecurityError, OSError) as exc:
        # A bind error is a ListenError, which names the address and the flag that set it.
        print(f"spinn-server: {SERVER_FLAGS.flag_text(str(exc))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
