"""Smoke test of bench/protocol.py: it runs end to end and ends with its JSON line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench import protocol as bench


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_bench_runs_and_reports(capsys: pytest.CaptureFixture[str]) -> None:
    args = "--images 2 --dict-images 20 --repeats 1 --frames 3 --window 2".split()
    assert bench.main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    figures = json.loads(lines[-1])
    assert figures["bench"] == "protocol"
    for key in (
        "sparse_zstd_ratio",
        "pack_mb_s",
        "unpack_mb_s",
        "framing_vs_raw",
        "framing_vs_raw_serial",
        "order0_ideal_ratio",
    ):
        assert figures[key] > 0, key
    assert figures["window"] == 2
    assert 0 < figures["int8_bits_per_value"] <= 8.0
    assert figures["sparse_zstd_ratio_min"] <= figures["sparse_zstd_ratio"]
    assert figures["sparse_zstd_ratio"] <= figures["sparse_zstd_ratio_max"]
    # Quantisation error is bounded by half a step on real activations (PROTOCOL.md §6.4).
    assert figures["max_err_scales"] <= 0.5 + 1e-3
    assert figures["sparse_zstd_ratio"] > figures["sparse_ratio"] > 1.0
    # The headroom rows code the same payloads losslessly: none can lose much to level 1.
    assert figures["headroom_best_ratio"] >= 0.95 * figures["sparse_zstd_ratio"]
    # The ceiling of a table-driven coder is a ratio of real bits, above the raw payload's.
    assert figures["static_model_ratio"] > figures["sparse_ratio"]


def test_cross_entropy_counts_the_bits_of_fitted_tables() -> None:
    rng = np.random.default_rng(0)
    contexts = rng.integers(0, 2, 4000)
    symbols = contexts.copy()  # each context decides its symbol
    fitted = bench._cross_entropy_bits((symbols, contexts), (symbols, contexts), 2)
    blind = bench._cross_entropy_bits((symbols, 0 * contexts), (symbols, 0 * contexts), 2)
    # Add-half smoothing: p = 2000.5 / 2001 per symbol, about 0.0004 bits each.
    assert fitted == pytest.approx(-4000 * np.log2(2000.5 / 2001))
    assert blind == pytest.approx(4000.0, rel=1e-3)  # a fair coin: one bit per symbol
    # A context never seen in training falls back to the uniform table: one bit each.
    unseen = bench._cross_entropy_bits((symbols, contexts), (symbols[:10], contexts[:10] + 2), 2)
    assert unseen == pytest.approx(10.0)


def test_bench_rejects_bad_arguments() -> None:
    with pytest.raises(SystemExit):
        bench.main(["--frames", "0"])
