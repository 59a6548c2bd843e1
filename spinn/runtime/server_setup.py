"""What a server serves, loaded from its configuration, before it listens.

``load_serving`` reads the checkpoint onto its torch device, the zstd dictionaries, the
token and the TLS context, and derives the frame limit, the protocol's connection limits
and the WELCOME description; ``Serving`` hands the server core what it knows of the model
(``served_model``) and how to decode an INFER's tensor (``decode``). The asyncio adapter
(``spinn.runtime.server``) only starts from it.
"""

from __future__ import annotations

import logging
import math
import os
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from protocol import ConnectionConfig, PackedTensor
from protocol.dictionaries import DictionaryError
from protocol.packing import IMAGE_CODEC, unpack
from spinn.runtime.accel import resolve_device
from spinn.runtime.compute import configure_torch, plan_workers, slow_down
from spinn.runtime.config import ServerConfig
from spinn.runtime.credentials import load_token, server_ssl_context
from spinn.runtime.server_core import BURST_S, ServedModel
from spinn.runtime.server_description import describe

if TYPE_CHECKING:
    from protocol.description import Description
    from protocol.dictionaries import ZstdDictionaries
    from spinn.model.checkpoint import CheckpointMeta
    from spinn.model.progressive import ProgressiveModel

__all__ = ["ListenError", "Serving", "frame_limit_for", "load_serving"]

_FRAME_HEADROOM = 64 * 1024
"""Bytes above the largest activation a frame may carry (msgpack envelope, PING padding)."""


class ListenError(OSError):
    """The server cannot listen on one of its addresses; the message names which one."""

    @classmethod
    def at(cls, flags: str, host: str, port: int, exc: OSError) -> ListenError:
        """The error of binding ``host:port``, which ``flags`` set, that failed with ``exc``."""
        # asyncio's bind errors repeat the address inside strerror; the errno's text is
        # the reason alone. Resolver errors have negative codes and only their strerror.
        code = exc.errno or 0
        reason = os.strerror(code) if code > 0 else exc.strerror or str(exc)
        where = f"{host}:{port}" if port else f"{host}, any free port"
        return cls(exc.errno, f"cannot listen on {where} ({flags}): {reason}")

    def __str__(self) -> str:
        return str(self.strerror)


def frame_limit_for(model: ProgressiveModel) -> int:
    """Default frame limit of a server of ``model`` (``LimitsConfig.max_frame_bytes``).

    float32 is the largest codec (``sparse_int8`` is at most ~1.13 bytes per element and
    zstd is used only when it shrinks the payload, PROTOCOL.md §6), so no honest INFER for
    any split ``0 ≤ s < S`` exceeds 4 bytes per element of the largest activation plus
    its envelope; the quarter and 64 KiB of headroom also fit the device's PING probes.
    """
    elements = max(math.prod(model.split_shape(s)) for s in range(model.num_stages))
    limit = 4 * elements + elements + _FRAME_HEADROOM
    return min(2**32 - 1, max(1024, limit))


@dataclass(frozen=True)
class Serving:
    """A server's model and the limits and credentials derived from its configuration."""

    config: ServerConfig
    model: ProgressiveModel
    """In eval mode on ``torch_device``."""
    meta: CheckpointMeta
    torch_device: torch.device
    workers: int
    """Compute threads (``plan_workers``)."""
    dictionaries: ZstdDictionaries | None
    """The zstd dictionaries beside the checkpoint, when loaded (sparse_int8_zdict)."""
    token: bytes | None
    ssl: ssl.SSLContext | None
    max_frame_bytes: int
    """The frame limit in force: the configured one, or the model's (``frame_limit_for``)."""
    connection_config: ConnectionConfig
    description: Description
    """What WELCOME of version 2 says about this server (PROTOCOL.md §5.12)."""

    def served_model(self) -> ServedModel:
        """What the server core knows of the model."""
        model = self.model
        return ServedModel(
            self.meta.model_id,
            self.meta.weights_sha256,
            tuple(tuple(model.split_shape(s)) for s in range(model.num_stages)),
            self.description,
            None if self.dictionaries is None else self.dictionaries.sha256,
        )

    def log_started(self, log: logging.Logger, port: int, metrics_port: int | None) -> None:
        """The lines that say what a server listening on ``port`` serves, and how."""
        config, meta = self.config, self.meta
        compute = config.compute
        log.info(
            "serving %s (model %s, sha256 %s…) on %s:%d with %d worker(s) × %d torch thread(s)"
            " on %s, batching %s%s",
            meta.arch,
            meta.model_id,
            meta.weights_sha256[:12],
            config.operations.host,
            port,
            self.workers,
            torch.get_num_threads(),
            self.torch_device,
            f"up to {compute.batch_max} waiting {compute.batch_wait_ms:g} ms"
            if compute.batch_max > 1
            else "off",
            "" if compute.report_compute else ", compute time NOT reported",
        )
        if self.dictionaries is not None:
            log.info("zstd dictionaries %r: sparse_int8_zdict accepted", self.dictionaries)
        log.info(
            "limits: %d device(s), frames up to %d bytes%s",
            config.limits.max_connections,
            self.max_frame_bytes,
            " (from the model)" if config.limits.max_frame_bytes is None else "",
        )
        if metrics_port is not None:
            log.info(
                "metrics on http://%s:%d/metrics", config.operations.metrics_host, metrics_port
            )
        if self.ssl is not None or self.token is not None:
            log.info(
                "security: TLS %s%s, token authentication %s",
                "on" if self.ssl else "off",
                " with client certificates" if config.security.tls_client_ca else "",
                "on" if self.token else "off",
            )

    def decode(self, tensor: PackedTensor) -> np.ndarray:
        """An INFER's tensor as the activation (the core's ``decode``)."""
        activation = unpack(tensor, self.config.limits.max_tensor_elements, self.dictionaries)
        if tensor.codec == IMAGE_CODEC:
            # The pixels become the model input exactly as on the device (§6.8).
            activation = self.model.input_spec.preprocess(torch.from_numpy(activation)).numpy()
        return activation


def load_serving(config: ServerConfig) -> Serving:
    """Load what ``config`` serves; raises for a checkpoint, dictionaries, token or
    certificate that cannot be used."""
    from spinn.model.checkpoint import load_checkpoint

    compute, limits, security = config.compute, config.limits, config.security
    workers, threads = plan_workers(compute.workers, compute.torch_threads)
    configure_torch(threads)
    model, meta = load_checkpoint(compute.checkpoint, allow_user_code=compute.allow_user_code)
    torch_device = resolve_device(compute.device)
    model.to(torch_device).eval()
    slow_down(model, compute.slowdown)  # emulation only
    dictionaries: ZstdDictionaries | None = None
    if compute.dictionaries:
        from spinn.model.zdict_file import load_dictionaries

        try:
            dictionaries = load_dictionaries(compute.checkpoint, meta.model_id, model.num_stages)
        except DictionaryError as exc:
            raise DictionaryError(
                f"{exc} (or serve without them: compute.dictionaries off)"
            ) from None
    token = None if security.token_file is None else load_token(security.token_file)
    max_frame_bytes = (
        frame_limit_for(model) if limits.max_frame_bytes is None else limits.max_frame_bytes
    )
    connection_config = ConnectionConfig(
        max_frame_size=max_frame_bytes,
        max_tensor_elements=limits.max_tensor_elements,
        auth_token=token,
    )
    description = describe(
        model,
        meta,
        max_batch=1,  # INFER carries one input (PROTOCOL.md §5.3)
        max_frame_bytes=max_frame_bytes,
        max_tensor_elements=limits.max_tensor_elements,
        max_in_flight=limits.max_queue_per_connection,
        max_outstanding=connection_config.max_outstanding,
        handshake_timeout_s=limits.handshake_timeout_s,
        idle_timeout_s=limits.idle_timeout_s,
        max_ping_rate=limits.max_ping_rate,
        max_ping_burst=BURST_S * limits.max_ping_rate,
        max_unknown_cancel_rate=limits.max_unknown_cancel_rate,
        max_unknown_cancel_burst=BURST_S * limits.max_unknown_cancel_rate,
    )
    context = None
    if security.tls_cert is not None and security.tls_key is not None:
        context = server_ssl_context(security.tls_cert, security.tls_key, security.tls_client_ca)
    return Serving(
        config,
        model,
        meta,
        torch_device,
        workers,
        dictionaries,
        token,
        context,
        max_frame_bytes,
        connection_config,
        description,
    )
