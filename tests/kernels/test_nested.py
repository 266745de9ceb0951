"""kernels.codecs.nested: a residual quantizer cut from a longer one of its family is the codec
trained on its own (codebooks, beam, codes, search, and serialised form but for the norm range
faiss notes in training, which a codec storing no norm never reads)."""

from __future__ import annotations

import numpy as np
import pytest

from vecpress.kernels._faiss import faiss
from vecpress.kernels.codecs.build import _innermost
from vecpress.kernels.codecs.codec import Codec
from vecpress.kernels.codecs.nested import first_half, nesting, residual_prefix
from vecpress.kernels.codecs.spec import CodecSpecError
from vecpress.kernels.synthetic import ClusteredEmbeddings

DIM = 64


@pytest.fixture(scope="module")
def xt():
    return ClusteredEmbeddings(DIM, seed=11, num_clusters=40).batch(0, 3000)


def without_norm_range(codec: Codec) -> bytes:
    copy = Codec.from_bytes(codec.to_bytes(), spec=codec.spec, metric=codec.metric)
    rq = _innermost(copy.index)[1].rq
    assert rq.search_type in (faiss.AdditiveQuantizer.ST_decompress, faiss.AdditiveQuantizer.ST_LUT_nonorm)
    rq.norm_min = rq.norm_max = 0.0
    return copy.to_bytes()


@pytest.mark.parametrize(("short", "long", "metric"), [
    ("RQ3x6", "RQ6x6", "l2"),
    ("RQ2x6,beam=1", "RQ5x6,beam=1", "cosine"),
    ("RQ2x6,beam=3", "RQ4x6", "ip"),  # (trained greedily on the CPU whatever the beam: 3 kept to encode)
    ("PCA32,RQ2x6", "PCA32,RQ4x6,beam=2", "l2"),
    ("MRL32,RQ3x6", "MRL32,RQ4x6", "cosine"),
])
def test_a_cut_codec_is_the_codec_trained_alone(xt, short, long, metric):
    alone = Codec.train(xt, short, metric, seed=3, ngpu=0)
    cut = residual_prefix(Codec.train(xt, long, metric, seed=3, ngpu=0), short)
    assert cut.spec == short and cut.code_size == alone.code_size
    assert without_norm_range(cut) == without_norm_range(alone)
    x = xt[:200]
    codes = alone.encode(x)
    assert np.array_equal(cut.encode(x), codes)
    assert np.array_equal(cut.search_codes(x[:5], codes, 4)[1], alone.search_codes(x[:5], codes, 4)[1])


def test_nesting_pairs_each_spec_with_the_longest_of_its_family():
    specs = ["RQ8x8,beam=1", "RQ16x8,beam=1", "RQ32x8,beam=1", "PCA64,RQ8x8,beam=1", "RQ16x4", "RQ16x8",
             "PQ16", "MRL128,RQ8x8,beam=1", "SQ8"]
    assert nesting(specs, 384, greedy=True) == {
        "RQ8x8,beam=1": "RQ32x8,beam=1", "RQ16x8,beam=1": "RQ32x8,beam=1", "RQ16x8": "RQ32x8,beam=1"}
    # as encoding counts them: only the beam=1 specs encode greedily
    assert nesting(specs, 384, greedy=False) == {"RQ8x8,beam=1": "RQ32x8,beam=1", "RQ16x8,beam=1": "RQ32x8,beam=1"}
    assert nesting(["RQ8x8", "RQ8x8,beam=2"], 384, greedy=True) == {}


def test_a_codec_outside_the_family_is_refused(xt):
    long = Codec.train(xt, "RQ4x6", "l2", seed=3, ngpu=0)
    for spec in ("RQ4x6", "RQ6x6", "RQ2x5", "PCA32,RQ2x6", "PQ4"):
        with pytest.raises(CodecSpecError, match="not the first stages"):
            residual_prefix(long, spec)


def test_greedy_codes_of_a_family_are_sliced_from_the_longest(xt):
    from vecpress.kernels.codecs.nested import cut_codes, encode_all

    long = Codec.train(xt, "RQ4x8,beam=1", "cosine", seed=3, ngpu=0)
    short = residual_prefix(long, "RQ2x8,beam=1")
    wide = residual_prefix(long, "RQ2x8")  # (beam 5: its codes are not the greedy ones)
    x = xt[:300]
    assert np.array_equal(cut_codes(long.encode(x), long, short), short.encode(x))
    assert cut_codes(long.encode(x), long, wide) is None and cut_codes(short.encode(x), short, long) is None
    pq = Codec.train(xt, "PQ4", "cosine", seed=3, ngpu=0)
    got = encode_all([short, pq, long, wide], x)
    assert [s is None for _, s in got] == [True, False, False, False]
    for codec, (codes, _) in zip([short, pq, long, wide], got):
        assert np.array_equal(codes, codec.encode(x)), codec.spec


@pytest.mark.parametrize(("short", "long", "metric"), [
    ("RQ2x8,beam=1", "RQ5x8,beam=1", "cosine"),
    ("PCA32,RQ1x8,beam=1", "PCA32,RQ3x8,beam=1", "l2"),
    ("MRL32,RQ2x8,beam=1", "MRL32,RQ4x8,beam=1", "ip"),
])
def test_a_longer_greedy_codec_encodes_on_from_a_shorter_one_s_codes(xt, short, long, metric):
    """Given a shorter codec's codes of the same rows (its first stages), a greedy residual
    quantizer searches only its other stages: the same bytes as encoding from nothing.
    encode_all does so where the shorter codes are the longer one's first bytes, and encodes
    from nothing otherwise (a beam wider than 1)."""
    from vecpress.kernels.codecs.nested import encode_all, train_on

    started = Codec.train(xt, short, metric, seed=3, ngpu=0)
    grown = train_on(started, long, xt, seed=3, ngpu=0)
    x = xt[:5000:3]  # (rows past one block of encoding)
    first = started.encode(x)
    whole = grown.encode(x)
    assert np.array_equal(grown.encode(x, first=first), whole)
    other = xt[1:5000:3]  # (other rows' codes: other codes, so the first stages are taken, not searched)
    assert not np.array_equal(grown.encode(x, first=started.encode(other))[:, :first.shape[1]], first)
    (codes, _), = encode_all([grown], x, shorter={0: (started, first)})
    assert np.array_equal(codes, whole)
    wide = Codec.train(xt, long.split(",beam")[0] + ",beam=2", metric, seed=3, ngpu=0)
    (codes, _), = encode_all([wide], x, shorter={0: (started, first)})  # (not greedy: encoded from nothing)
    assert np.array_equal(codes, wide.encode(x))
    with pytest.raises(ValueError, match="takes no first stages"):
        wide.encode(x, first=first)
    with pytest.raises(ValueError, match="do not fit"):
        grown.encode(x[:10], first=first)


@pytest.mark.parametrize(("short", "long", "metric"), [
    ("RQ2x6,beam=1", "RQ5x6,beam=1", "cosine"),
    ("RQ3x6", "RQ4x6,beam=2", "l2"),
    ("PCA32,RQ2x6", "PCA32,RQ4x6", "ip"),
    ("MRL32,RQ1x6", "MRL32,RQ3x6", "cosine"),
])
def test_a_longer_codec_trained_on_from_a_shorter_one_is_the_codec_trained_alone(xt, short, long, metric):
    """train_on takes the shorter codec's stages and trains the rest: the same bytes as
    training the longer codec from nothing (norm range included: it is noted over every
    stage), and its progress counts only the stages it trains."""
    from vecpress.kernels.codecs.nested import train_on

    seen = []
    started = Codec.train(xt, short, metric, seed=3, ngpu=0)
    grown = train_on(started, long, xt, seed=3, ngpu=0, progress=lambda done, total: seen.append((done, total)))
    alone = Codec.train(xt, long, metric, seed=3, ngpu=0)
    assert grown.spec == long and grown.to_bytes() == alone.to_bytes()
    todo = _innermost(alone.index)[1].rq.M - _innermost(started.index)[1].rq.M
    assert seen == [(i, todo) for i in range(1, todo + 1)]


@pytest.mark.parametrize("rough", [{"rq_last": 1}, {"rq_steps": 2}, {"rq_last": 2, "rq_steps": 2}])
def test_a_codec_trained_to_be_judged_grows_into_the_judged_longer_one(xt, rough):
    """With fewer k-means iterations in each stage's last step (Iterations.rq_last) or fewer
    progressive steps (Iterations.rq_steps), the advisor's judging, the codec differs from the
    usual one, a longer one trained on from it is the longer one judged alike from nothing, and
    where the rows are too few for RQ_PROGRESSIVE's schedule (under 39 per centroid) the
    training is faiss's as ever."""
    from vecpress.kernels.codecs.nested import train_on
    from vecpress.kernels.codecs.train import Iterations

    rough = Iterations(**rough)
    short = Codec.train(xt, "RQ2x6,beam=1", "cosine", seed=3, ngpu=0, iterations=rough)
    assert short.to_bytes() != Codec.train(xt, "RQ2x6,beam=1", "cosine", seed=3, ngpu=0).to_bytes()
    grown = train_on(short, "RQ4x6,beam=1", xt, seed=3, ngpu=0, iterations=rough)
    assert grown.to_bytes() == Codec.train(xt, "RQ4x6,beam=1", "cosine", seed=3, ngpu=0, iterations=rough).to_bytes()
    few = xt[:2000]  # (39 x 64 = 2,496 rows needed for the schedule)
    assert Codec.train(few, "RQ2x6,beam=1", "cosine", seed=3, ngpu=0, iterations=rough).to_bytes() == \
        Codec.train(few, "RQ2x6,beam=1", "cosine", seed=3, ngpu=0).to_bytes()


def test_fewer_progressive_steps_are_the_schedule_of_that_many_steps(xt, monkeypatch):
    """Iterations(rq_steps=s) trains the codec that RQ_PROGRESSIVE's schedule with s steps (and
    its iterations) trains, the last step's iterations (rq_last) still applied to the last step."""
    from vecpress.kernels.codecs import train
    from vecpress.kernels.codecs.train import Iterations

    steps = [Codec.train(xt, "RQ2x6,beam=1", "cosine", seed=3, ngpu=0, iterations=Iterations(rq_steps=2, rq_last=r))
             for r in (None, 1)]
    assert steps[0].to_bytes() != steps[1].to_bytes()
    monkeypatch.setattr(train, "RQ_PROGRESSIVE", (2, train.RQ_PROGRESSIVE[1]))
    assert steps[0].to_bytes() == Codec.train(xt, "RQ2x6,beam=1", "cosine", seed=3, ngpu=0).to_bytes()
    assert steps[1].to_bytes() == Codec.train(xt, "RQ2x6,beam=1", "cosine", seed=3, ngpu=0,
                                              iterations=Iterations(rq_last=1)).to_bytes()


def test_training_on_needs_a_shorter_codec_of_the_family(xt):
    from vecpress.kernels.codecs.nested import train_on

    short = Codec.train(xt, "RQ2x6", "l2", seed=3, ngpu=0)
    for spec in ("RQ2x6", "RQ1x6", "RQ4x5", "PCA32,RQ4x6", "PQ4"):
        with pytest.raises(CodecSpecError, match="does not hold"):
            train_on(short, spec, xt, seed=3, ngpu=0)


def test_the_first_half_of_a_residual_quantizer_is_its_family_s():
    assert first_half("RQ64x8,beam=1", 384) == "RQ32x8,beam=1"
    assert first_half("PCA64,RQ9x8", 384) == "PCA64,RQ4x8"
    assert first_half("MRL128,RQ16x8,beam=1", 384) == "MRL128,RQ8x8,beam=1"
    for other in ("RQ1x8", "PRQ2x2x8", "PQ16", "SQ8", "LSQ8x8", "RQ8x8_Nqint8"):
        assert first_half(other, 384) is None, other
