"""Progress inside a long training: a PQ's sub-quantizers and a residual quantizer's stages
as steps with the time left, an LSQ's iterations (and faiss's own RQ and PQ training, the GPU
route) read from faiss's verbose lines, and a line every few seconds from any training that
reports no steps."""

from __future__ import annotations

import logging
import os
import re
import time

import numpy as np
import pytest

from vecpress.kernels.codecs.codec import Codec
from vecpress.pipeline.heartbeat import Heartbeat, train_logged


def test_pq_training_reports_each_sub_quantizer():
    x = np.random.default_rng(0).standard_normal((3000, 32)).astype(np.float32)
    seen = []
    Codec.train(x, "PQ8", "l2", progress=lambda done, total: seen.append((done, total)))
    assert seen == [(i, 8) for i in range(1, 9)]


def test_residual_quantizer_training_logs_its_stages(caplog):
    caplog.set_level(logging.INFO, logger="vecpress")
    x = np.random.default_rng(0).standard_normal((3000, 32)).astype(np.float32)
    train_logged(Codec, x, "RQ3x6", "l2", seed=0, ngpu=0, what="train: ")
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("train: RQ3x6 on 3,000 vectors: 3/3 steps") for line in lines), lines


def test_steps_are_logged_with_the_time_left_and_silence_gets_a_heartbeat(caplog):
    caplog.set_level(logging.INFO, logger="vecpress")
    with Heartbeat("train: X", every=0.2, step_every=0.0) as beat:
        beat.step(1, 4)
        time.sleep(0.5)
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("train: X: 1/4 steps") and "left" in line for line in lines), lines
    assert any("still at work" in line for line in lines), lines


def _steps(caplog, what):
    """The (done, total) of every step line logged for `what`."""
    out = []
    for r in caplog.records:
        m = re.match(rf"{re.escape(what)}: (\d+)/(\d+) steps", r.getMessage())
        if m:
            out.append((int(m[1]), int(m[2])))
    return out


def test_lsq_training_is_heard_of_per_iteration_through_faiss_lines(caplog, capfd):
    """LSQ trains inside one faiss call: its iterations are read from faiss's verbose lines on
    standard output, each a step; the lines themselves go nowhere, and the codec is the one
    trained without anyone listening."""
    caplog.set_level(logging.INFO, logger="vecpress")
    x = np.random.default_rng(0).standard_normal((3000, 32)).astype(np.float32)
    with Heartbeat("train: LSQ", step_every=0.0) as beat:
        heard = Codec.train(x, "LSQ4x6", "l2", seed=1, progress=beat)
    assert _steps(caplog, "train: LSQ") == [(i, 25) for i in range(1, 26)]
    assert heard.to_bytes() == Codec.train(x, "LSQ4x6", "l2", seed=1).to_bytes()
    out = capfd.readouterr().out
    assert "obj =" not in out and "iter " not in out


@pytest.mark.parametrize(("factory", "total"), [("RQ3x6", 3), ("PQ4", 4), ("PRQ2x2x5", 4)])
def test_trainings_faiss_runs_in_one_call_report_steps(caplog, factory, total):
    """faiss's own RQ and PQ training (the GPU route; on the CPU vecpress trains them step by
    step itself): each stage or sub-quantizer a step, read from faiss's verbose lines."""
    import faiss

    from vecpress.kernels.codecs.train import _faiss_progress

    caplog.set_level(logging.INFO, logger="vecpress")
    x = np.random.default_rng(0).standard_normal((3000, 32)).astype(np.float32)
    index = faiss.index_factory(32, factory)
    with Heartbeat(f"train: {factory}", step_every=0.0) as beat, _faiss_progress(index, beat):
        index.train(x)
    assert _steps(caplog, f"train: {factory}") == [(i, total) for i in range(1, total + 1)]


def test_faiss_lines_pass_other_output_through_and_read_one_training_at_a_time(caplog, capfd):
    caplog.set_level(logging.INFO, logger="vecpress")
    step, chatter = re.compile(r"^step$"), re.compile(r"^\tnoise")
    with Heartbeat("t", step_every=0.0) as beat, beat.faiss_lines(step, chatter, 2) as reading:
        with Heartbeat("u").faiss_lines(step, chatter, 2) as second:
            assert reading and not second
        os.write(1, b"step\n\tnoise 1\nsomeone else's line\nstep\n")
        print("a print meanwhile", flush=True)
    assert _steps(caplog, "t") == [(1, 2), (2, 2)]
    out = capfd.readouterr().out
    assert "someone else's line" in out and "a print meanwhile" in out and "noise" not in out
    with Heartbeat("v").faiss_lines(step, chatter, 1) as again:  # (given back)
        assert again


def test_without_a_standard_output_faiss_lines_read_nothing_and_training_goes_on(caplog):
    """File descriptor 1 closed (a daemon's): no lines to read, a heartbeat only, and the
    training unharmed."""
    x = np.random.default_rng(0).standard_normal((2000, 16)).astype(np.float32)
    saved = os.dup(1)
    try:
        os.close(1)
        with Heartbeat("t") as beat:
            with beat.faiss_lines(re.compile("x"), re.compile("y"), 1) as reading:
                assert not reading
            trained = Codec.train(x, "LSQ2x4", "l2", seed=1, progress=beat)
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    assert trained.to_bytes() == Codec.train(x, "LSQ2x4", "l2", seed=1).to_bytes()
