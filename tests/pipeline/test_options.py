"""The options model is the one declaration: the CLI, the flow's parameters and the sweep
follow it, and it validates what it is given."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from vecpress.flows.cli import build_parser
from vecpress.pipeline.errors import ConfigError
from vecpress.pipeline.options import OPTIONS, CompressOptions, options_of


def _flags(command: str) -> dict[str, object]:
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    return {a.dest: a for a in sub._actions}


@pytest.mark.parametrize("command", ["compress", "schedule", "demo", "sweep"])
def test_every_option_of_a_command_is_on_its_command_line(command):
    flags = _flags(command)
    for o in options_of(command):
        assert o.name in flags, f"{command} lacks --{o.name}"
        assert o.info.help.split(" (")[0][:30].replace("%", "%%") in flags[o.name].help


def test_the_flow_takes_every_option_with_its_default():
    from vecpress.flows.compress import compress_flow

    params = inspect.signature(compress_flow.fn).parameters
    assert set(params) == {"inputs", "out", "table", "run_id", *OPTIONS}
    for name, o in OPTIONS.items():
        default = list(o.default) if isinstance(o.default, tuple) else o.default
        assert params[name].default == default, name
        assert o.info.help in compress_flow.fn.__doc__  # Prefect shows it as the parameter's description
    schema = compress_flow.parameters.properties
    assert schema["keep"]["type"] == "array" and schema["num_train"]["type"] == "integer"


def test_cli_arguments_become_options():
    args = build_parser().parse_args(["compress", "in", "out", "--table", "t", "--keep", "a, b", "--advise-codecs",
                                      "OPQ8,PQ8;SQ8", "--max-bytes", "16", "--no-eval-rerank", "--ngpu", "0"])
    from vecpress.flows.cli import options_from_args

    opts = options_from_args(args, "compress")
    assert opts.keep == ("a", "b") and opts.advise_codecs == ("OPQ8,PQ8", "SQ8") and opts.codec == "auto"
    assert opts.eval_rerank is False and opts.device == "cpu"  # --ngpu 0 means no GPU at all


def test_params_round_trip_and_unknown_names_are_refused():
    opts = CompressOptions(codec="PQ8", keep=("text",), advise_codecs=None, seed=3)
    assert CompressOptions.from_params(opts.to_params()) == opts
    assert opts.changed() == {"codec": "PQ8", "keep": ["text"], "seed": 3}
    assert CompressOptions.from_params({"keep": ["a"]}).keep == ("a",)  # JSON lists become tuples
    assert CompressOptions.from_params({"keep": None}).keep == ()
    with pytest.raises(ConfigError, match="unknown option.*nmu_train"):
        CompressOptions.from_params({"nmu_train": 5})


@pytest.mark.parametrize("kw,needle", [
    (dict(metric="hamming"), "unknown metric"),
    (dict(num_train=0), "num_train must be at least 1"),
    (dict(batch_size=-1), "batch_size"),
    (dict(ngpu=-2), "--ngpu must be"),
    (dict(device="gpu"), "device must be"),
    (dict(mode="nightly"), "mode must be"),
    (dict(gate_min_recall=2.0), "--gate-min-recall"),
])
def test_bad_options_name_themselves(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        CompressOptions(**kw)


def test_device_cpu_and_ngpu_0_are_one_setting():
    assert (CompressOptions(device="cpu").ngpu, CompressOptions(ngpu=0).device) == (0, "cpu")
    assert dataclasses.replace(CompressOptions(), device="cuda:1").ngpu == -1
