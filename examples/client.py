"""A minimal SPINN device, written from docs/PROTOCOL.md alone: Python, msgpack, numpy.

It holds no model: it sends each image whole (split 0, "server-only") and the server
runs the network. Everything it needs comes from WELCOME's description (§5.12): the
input shape, the preprocessing, the class names and the frame limit. Requests are
pipelined (§1), answered by RESULT or ERROR (§5.4, §8.1), and the connection ends with
BYE (§7.3). With --token-file it authenticates (§10).

    python examples/client.py 127.0.0.1:7878 \\
        --images /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz \\
        --labels /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz --limit 200

One JSON line per image; the last line is a summary (with the accuracy, given labels).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import hmac
import json
import secrets
import socket
import struct
import sys
import time

import msgpack
import numpy as np

HELLO, WELCOME, INFER, RESULT, PING, PONG, ERROR, BYE, CHALLENGE, AUTH = (
    1,
    2,
    3,
    4,
    6,
    7,
    8,
    9,
    10,
    11,
)


class Link:
    """Frames over one TCP connection (§3): a 4-byte big-endian length, then msgpack."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=30)
        self.buf = b""

    def send(self, mtype: int, fields: dict) -> None:
        body = msgpack.packb([mtype, fields], use_bin_type=True)
        self.sock.sendall(struct.pack(">I", len(body)) + body)

    def recv(self) -> tuple[int, dict]:
        while True:
            if len(self.buf) >= 4:
                (n,) = struct.unpack(">I", self.buf[:4])
                if len(self.buf) >= 4 + n:
                    body, self.buf = self.buf[4 : 4 + n], self.buf[4 + n :]
                    mtype, fields = msgpack.unpackb(body, raw=False)
                    return mtype, fields
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("the server closed the connection")
            self.buf += data


def read_token(path: str) -> bytes:
    """§10: the file's bytes without leading and trailing ASCII whitespace."""
    with open(path, "rb") as f:
        return f.read().strip(b" \t\n\r\x0b\x0c")


def handshake(link: Link, token: bytes | None) -> dict:
    """HELLO → (CHALLENGE → AUTH →) WELCOME; returns WELCOME's fields."""
    hello = {"version": 2, "model_id": "", "weights_sha256": "", "codecs": ["float32"]}
    nonce = secrets.token_bytes(32)
    if token is not None:
        hello["auth_nonce"] = nonce
    link.send(HELLO, hello)
    mtype, fields = link.recv()
    if mtype == CHALLENGE:
        if token is None:
            raise SystemExit("the server requires a token (--token-file)")
        both = nonce + fields["nonce"]
        expected = hmac.digest(token, b"SPINN-1 server" + both, hashlib.sha256)
        if not hmac.compare_digest(expected, fields["proof"]):  # the server proves it first
            link.send(ERROR, {"code": 9, "message": "CHALLENGE proof does not match"})
            raise SystemExit("the server does not hold our token")
        link.send(AUTH, {"proof": hmac.digest(token, b"SPINN-1 device" + both, hashlib.sha256)})
        mtype, fields = link.recv()
    elif token is not None and mtype == WELCOME:
        link.send(ERROR, {"code": 9, "message": "WELCOME without CHALLENGE"})
        raise SystemExit("the server skipped authentication")
    if mtype == ERROR:
        raise SystemExit(f"refused: error {fields['code']}: {fields['message']}")
    if mtype != WELCOME or fields.get("version") != 2 or "description" not in fields:
        raise SystemExit(f"unexpected answer to HELLO: type {mtype}")
    return fields


def preprocess(pixels: np.ndarray, d: dict) -> np.ndarray:
    """§5.12: x = (float32(p) / 255 − mean[c]) / std[c], every step in float32."""
    mean = np.asarray(d["input_mean"], np.float32).reshape(-1, 1, 1)
    std = np.asarray(d["input_std"], np.float32).reshape(-1, 1, 1)
    x = (pixels.astype(np.float32) / np.float32(255) - mean) / std
    return x.reshape(1, *d["input_shape"])  # batch 1 (§5.3)


def infer(link: Link, rid: int, x: np.ndarray, thr_conf: float) -> None:
    tensor = {  # §6.2: float32 little-endian, C order; scale 1, zero point 0
        "codec": "float32",
        "compressed": False,
        "shape": list(x.shape),
        "scale": 1.0,
        "zero_point": 0,
        "payload": x.astype("<f4").tobytes(),
    }
    link.send(INFER, {"request_id": rid, "split": 0, "thr_conf": thr_conf, "tensor": tensor})


def read_idx(path: str) -> np.ndarray:
    """An IDX file (MNIST format, optionally gzipped): uint8 images or labels."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("server", help="HOST:PORT")
    p.add_argument("--images", required=True, help="IDX images, uint8, N×H×W or N×C×H×W")
    p.add_argument("--labels", help="IDX labels, for the accuracy")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--thr", type=float, default=0.8, help="exit threshold (thr_conf)")
    p.add_argument("--window", type=int, default=8, help="requests in flight at most")
    p.add_argument("--token-file", help="shared token (§10)")
    args = p.parse_args(argv)
    host, _, port = args.server.rpartition(":")
    images = read_idx(args.images)[: args.limit]
    labels = read_idx(args.labels)[: args.limit] if args.labels else None
    token = read_token(args.token_file) if args.token_file else None

    link = Link(host, int(port))
    welcome = handshake(link, token)
    d = welcome["description"]
    classes = d["classes"]
    window = min(args.window, d["max_in_flight"])
    sent, answered, correct, errors = 0, 0, 0, 0
    while answered < len(images):
        while sent < len(images) and sent - answered < window:
            infer(link, sent, preprocess(images[sent].reshape(d["input_shape"]), d), args.thr)
            sent += 1
        mtype, f = link.recv()
        if mtype == PING:  # a server MAY ping (§5.6): answer it, echoing sent_at as sent
            pong = {"seq": f["seq"], "sent_at": f["sent_at"], "received_at": time.time()}
            link.send(PONG, {**pong, "padding_len": len(f.get("padding", b""))})
            continue
        if mtype == ERROR and f.get("request_id") is None:
            raise SystemExit(f"fatal error {f['code']}: {f['message']}")
        if mtype not in (RESULT, ERROR):
            continue
        rid, answered = f["request_id"], answered + 1
        record: dict = {"image": rid}
        if mtype == RESULT:
            top = f["classes"][0]
            record.update(cls=top, name=classes[top], prob=f["probs"][0], exit=f["exit_index"])
            correct += labels is not None and top == int(labels[rid])
        else:
            errors += 1
            record.update(error=f["code"], message=f["message"])
        print(json.dumps(record))
    link.send(BYE, {})
    while link.recv()[0] != BYE:  # §7.3: wait for the server's BYE
        pass
    link.sock.close()
    summary = {"images": answered, "errors": errors, "model_id": welcome["model_id"]}
    if labels is not None:
        summary["accuracy"] = correct / max(1, answered - errors)
    print(json.dumps(summary))
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
