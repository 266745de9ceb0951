"""Progress inside a long training: a PQ's sub-quantizers and a residual quantizer's stages
as steps with the time left, and a line every few seconds from any training that reports no
steps."""

from __future__ import annotations

import logging
import time

import numpy as np

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
