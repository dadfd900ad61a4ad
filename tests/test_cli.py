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


HEAVY = ("torch", "transformers", "deepspeed", "streaming", "triton")
COMMANDS = [
    "config", "train", "demo", "prepare", "prepare-text", "plan", "bench", "bench kernels", "export", "universal",
    "eval", "compare", "compare configs/demo.yaml", "bench configs/demo.yaml",
]  # fmt: skip


def _run_cli(argv: list[str]) -> tuple[str, list[str], float]:
    """(what `megajepa ARGV` prints, the heavy modules it imported, seconds), in a fresh interpreter."""
    import ast
    import subprocess
    import sys
    import time
    from pathlib import Path

    code = (
        "import sys\nfrom megajepa.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)"
    )
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True
    )
    *printed, imported = result.stderr.rstrip().split("\n")
    return result.stdout + "\n".join(printed), ast.literal_eval(imported), time.perf_counter() - start


@pytest.mark.parametrize("command", COMMANDS)
def test_help_is_instant_and_imports_no_framework(command):
    printed, imported, seconds = _run_cli([*command.split(), "--help"])
    assert printed.startswith(f"usage: megajepa {command.split()[0]}")
    assert imported == [] and seconds < 3.0


def test_bench_help_lists_its_options():
    printed, _, _ = _run_cli(["bench", "--help"])
    assert all(option in printed for option in ("--modes", "--steps", "--nproc", "--scaling", "bench kernels", "bench head"))


@pytest.mark.parametrize(
    "argv",
    [
        ["compare", "configs/demo.yaml", "--arms", "jepa,nope"],
        ["compare", "--seeds", "0", "configs/demo.yaml"],
        ["bench", "configs/demo.yaml", "--nproc", "0"],
        ["demo", "configs/demo.yaml", "--nproc", "x"],
        ["eval", "runs/demo", "--data", "data/demo/shards/eval", "--batch-pairs", "1"],
        ["plan", "configs/demo.yaml"],
        ["prepare", "in.jsonl"],
    ],
)
def test_argument_errors_are_instant(argv):
    printed, imported, seconds = _run_cli(argv)
    assert f"usage: megajepa {argv[0]}" in printed and "error:" in printed
    assert imported == [] and seconds < 3.0


def _parsed(argv: list[str]):
    """The options a subcommand parses from argv (the command itself is not run)."""
    from megajepa.bench.command import parse_args as bench_args
    from megajepa.compare import parse_args as compare_args

    if argv[0] == "demo":
        seen = {}
        real = cli.cmd_demo
        cli.cmd_demo = lambda args: seen.setdefault("args", args) and 0
        try:
            cli.main(argv)
        finally:
            cli.cmd_demo = real
        return seen["args"]
    return {"bench": bench_args, "compare": compare_args}[argv[0]](argv[1:])


@pytest.mark.parametrize("command, option", [("demo", "--nproc"), ("bench", "--nproc"), ("compare", "--seeds")])
def test_shared_options_go_anywhere_in_every_subcommand(command, option):
    """--nproc and --seeds come from one parent parser each and parse the same in every position."""
    dest = option.lstrip("-")
    placements = [
        [command, option, "3", "configs/demo.yaml", "a.b=1", "c.d=2"],
        [command, "configs/demo.yaml", option, "3", "a.b=1", "c.d=2"],
        [command, "configs/demo.yaml", "a.b=1", f"{option}=3", "c.d=2"],
        [command, "configs/demo.yaml", "a.b=1", "c.d=2", option, "3"],
    ]
    for argv in placements:
        args = _parsed(argv)
        assert (getattr(args, dest), args.config, args.overrides) == (3, "configs/demo.yaml", ["a.b=1", "c.d=2"]), argv


def test_summary_table_judges_collapse_only_where_there_are_pairs():
    from megajepa.cli import summary_table

    row = {"loss": 1.0, "ce": 1.0, "jepa": 0.0, "step_seconds": 1.0}
    next_token = summary_table({"first": row, "last": row, "eval_ce": 0.5, "start_eval_ce": 2.0})
    assert "z_a std" not in next_token and "collapse" not in next_token
    figures = {"z_a_std": 0.02, "z_b_std": 0.03, "cos_matched": 0.999, "cos_mismatched": 0.999, "collapsed": 1.0}
    held_out = {f"eval_{k}": v for k, v in figures.items()} | {f"start_eval_{k}": 0.5 for k in figures}
    table = summary_table({"first": row, "last": row, **held_out})
    assert "| held-out z_a std x sqrt(d) (collapsed < 0.1) | 0.5000 | 0.0200 |" in table
    assert "collapse (held-out, end): collapsed: one point for every record" in table
