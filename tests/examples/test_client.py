"""examples/client.py, the reference client written from PROTOCOL.md alone, against a
real server: token authentication, the description, pipelined server-only requests and
BYE, at the shipped model's accuracy (which needs the preprocessing of §5.12 exactly)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spinn.offline.data import FASHION_MNIST_DIR
from spinn.pretrained import DEFAULT_CHECKPOINT
from spinn.runtime.server import SpinnServer
from tests.support.runtime import ROOT, serve

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

CLIENT = ROOT / "examples" / "client.py"
IMAGES = Path(FASHION_MNIST_DIR) / "t10k-images-idx3-ubyte.gz"
LABELS = Path(FASHION_MNIST_DIR) / "t10k-labels-idx1-ubyte.gz"


def _client(port: int, *flags: str) -> subprocess.CompletedProcess[str]:
    # Run as an outsider would: a plain interpreter, the repository not on its path.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [sys.executable, str(CLIENT), f"127.0.0.1:{port}", "--images", str(IMAGES), *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd="/")


def test_the_reference_client_is_served_at_the_models_accuracy(tmp_path: Path) -> None:
    if not IMAGES.exists():
        pytest.skip(f"Fashion-MNIST missing ({IMAGES})")
    token = tmp_path / "token"
    token.write_text("  " + "0123456789abcdef" * 2 + "\n")  # §10: whitespace around it
    token.chmod(0o600)
    done: list[subprocess.CompletedProcess[str]] = []

    async def body(server: SpinnServer, port: int) -> None:
        flags = ("--labels", str(LABELS), "--limit", "300", "--token-file", str(token))
        done.append(await asyncio.to_thread(_client, port, *flags))
        # Without the token the server refuses it, and the client says so.
        done.append(await asyncio.to_thread(_client, port, "--limit", "1"))

    server = serve(DEFAULT_CHECKPOINT, body, token_file=token)
    ok, refused = done
    assert ok.returncode == 0, ok.stderr[-3000:]
    lines = [json.loads(line) for line in ok.stdout.splitlines()]
    records, summary = lines[:-1], lines[-1]
    assert sorted(r["image"] for r in records) == list(range(300))
    assert summary["images"] == 300 and summary["errors"] == 0
    # The shipped model: 92.2 % at thr_conf 0.8 on the test set; plain x/255 would give
    # about a quarter. 300 images leave a few points of sampling error.
    assert summary["accuracy"] >= 0.87, summary
    assert {r["name"] for r in records} <= set(server.meta.class_names)
    assert server.stats.computed == 300
    assert refused.returncode != 0
    assert "refused: error 9" in refused.stderr, refused.stderr
