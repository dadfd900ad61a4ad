"""The `megajepa` command line: where options may go among a command's dotted overrides."""

import pytest

from megajepa import cli


@pytest.fixture
def demo_args(monkeypatch):
    """What `megajepa demo` would run with, without running it."""
    seen = {}
    monkeypatch.setattr(cli, "cmd_demo", lambda args: seen.setdefault("args", args) and 0)
    return seen


@pytest.mark.parametrize(
    "argv, nproc, overrides",
    [
        (["demo", "configs/demo.yaml", "train.steps=5", "--nproc", "3"], 3, ["train.steps=5"]),
        (["demo", "configs/demo.yaml", "--nproc", "3", "train.steps=5"], 3, ["train.steps=5"]),
        (["demo", "--nproc=1", "configs/demo.yaml", "a.b=1", "c.d=-2"], 1, ["a.b=1", "c.d=-2"]),
        (["demo", "configs/demo.yaml", "a.b=1", "--nproc", "4", "c.d=2"], 4, ["a.b=1", "c.d=2"]),
        (["demo", "configs/demo.yaml", "a.b=1"], 2, ["a.b=1"]),
    ],
)
def test_demo_takes_nproc_anywhere(demo_args, argv, nproc, overrides):
    cli.main(argv)
    args = demo_args["args"]
    assert (args.config, args.nproc, args.overrides) == ("configs/demo.yaml", nproc, overrides)


def test_demo_still_rejects_unknown_options(demo_args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "configs/demo.yaml", "a.b=1", "--nprocs", "2"])
    assert exit_info.value.code == 2
    assert "--nprocs" in capsys.readouterr().err


def test_an_architecture_the_packed_pass_cannot_run_is_refused_by_name_before_any_work(tmp_path, capsys):
    spec = tmp_path / "bloom.json"
    spec.write_text('{"model_type": "bloom", "hidden_size": 32, "n_layer": 2, "n_head": 4}')
    with pytest.raises(SystemExit) as stop:
        cli.main(["config", "configs/demo.yaml", f"model.config={spec}"])
    assert stop.value.code == 2
    assert "config error: model architecture bloom: its ALiBi attention bias" in capsys.readouterr().err
