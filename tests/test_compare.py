"""`megajepa compare` with 2 seeds and tiny runs, and the statistics behind its table."""

import json
import math

import pytest
import torch

from _train_utils import demo_overrides
from megajepa.cli import main as cli
from megajepa.compare import DEFAULT_ARMS, STP_LAMBDA, Run, format_table, parse_args, plan_runs, summarize
from megajepa.config import ConfigError, load_config
from megajepa.eval.run import METRICS
from megajepa.eval.stats import betainc, mean_std, paired_t_test, t_sf

ARMS = ("next-token", "jepa", "stp")  # the end-to-end test's three


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_compare_three_arms_two_seeds_writes_table_json_and_png(demo_data, tmp_path, capsys, restore_threads):
    out = tmp_path / "compare"
    overrides = demo_overrides(demo_data, tmp_path / "unused", **{"train.steps": 3, "train.eval_batches": 1})
    overrides = [o for o in overrides if not o.startswith("train.output_dir=")]
    options = ["--seeds", "2", "--jobs", "2", "--out", str(out), "--limit", "16", "--batch-pairs", "8"]
    options += ["--arms", "next-token,jepa,stp"]
    assert cli(["compare", "configs/demo.yaml", *options, "--max-new-tokens", "8", *overrides]) == 0

    names = {f"{arm}-seed{seed}" for arm in ARMS for seed in (0, 1)}
    report = json.loads((out / "compare.json").read_text())
    assert set(report["runs"]) == names and report["seeds"] == 2 and report["arms"] == list(ARMS)
    lambdas = {"next-token": 0.0, "jepa": 1.0, "stp": STP_LAMBDA}
    for name in names:
        arm = name.rsplit("-seed", 1)[0]
        config = json.loads((out / name / "run.json").read_text())["config"]
        assert config["jepa"]["lambda_"] == lambdas[arm]
        assert config["jepa"]["objective"] == ("stp" if arm == "stp" else "llm_jepa")
        assert config["train"]["seed"] == config["data"]["seed"] == int(name[-1])
        assert config["train"]["steps"] == 3
    for name, row in report["summary"].items():
        for arm in ARMS:
            values = [report["runs"][f"{arm}-seed{s}"][name] for s in (0, 1)]
            assert row[arm]["values"] == values and row[arm]["mean"] == pytest.approx(sum(values) / 2)
        for arm in ("jepa", "stp"):
            assert row[arm]["difference"] == pytest.approx(row[arm]["mean"] - row["next-token"]["mean"])
            assert row[arm]["p_value"] is None or 0.0 <= row[arm]["p_value"] <= 1.0
    # the next-token arm never trained the latent term: the JEPA arm's is the smaller loss
    assert report["summary"]["jepa_loss"]["jepa"]["mean"] < report["summary"]["jepa_loss"]["next-token"]["mean"]
    # the STP arm trained its own term, from the conversation alone (no view tokens computed)
    for seed in (0, 1):
        stp_rows = [json.loads(line) for line in (out / f"stp-seed{seed}" / "metrics.jsonl").read_text().splitlines()]
        jepa_rows = [json.loads(line) for line in (out / f"jepa-seed{seed}" / "metrics.jsonl").read_text().splitlines()]
        assert all(r["jepa"] > 0 for r in stp_rows)
        assert stp_rows[0]["computed_tokens"] < jepa_rows[0]["computed_tokens"]

    table = (out / "compare.md").read_text()
    assert table in capsys.readouterr().out
    header = "| metric (2 seeds) | next-token only | + JEPA | + STP | JEPA - next-token | p (JEPA better) | STP - next-token | p (STP better) |"
    assert header in table
    for label, _ in METRICS.values():
        assert f"| {label} (" in table
    assert "load average" in table and "2 seeds x 3 arms" in table
    collapsed = {arm: int(sum(report["runs"][f"{arm}-seed{s}"]["collapsed"] for s in (0, 1))) for arm in ARMS}
    assert f"next-token collapsed in {collapsed['next-token']} of 2 seeds; JEPA collapsed in {collapsed['jepa']} of 2" in table
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the same comparison again: every training and evaluation is reused, the same table drawn
    evaluated = {name: (out / name / "eval.json").stat().st_mtime_ns for name in names}
    assert cli(["compare", "configs/demo.yaml", *options, "--max-new-tokens", "8", *overrides]) == 0
    printed = capsys.readouterr().out
    assert "reusing 6 finished run(s)" in printed and "reusing 6 evaluation(s)" in printed
    assert {name: (out / name / "eval.json").stat().st_mtime_ns for name in names} == evaluated
    assert json.loads((out / "compare.json").read_text())["runs"] == report["runs"]
    # another generation cap is another evaluation
    assert cli(["compare", "configs/demo.yaml", *options, "--max-new-tokens", "9", *overrides]) == 0
    assert "reusing 6 evaluation(s)" not in capsys.readouterr().out
    assert all((out / name / "eval.json").stat().st_mtime_ns > evaluated[name] for name in names)

    # the same directory with another config is refused before any training
    assert cli(["compare", "configs/demo.yaml", *options, *overrides, "train.steps=4"]) == 2
    assert "a run of another config" in capsys.readouterr().err


def _runs(seeds: int, arms=DEFAULT_ARMS) -> list[Run]:
    return [Run(arm, s, f"unused/{arm}-seed{s}", []) for s in range(seeds) for arm in arms]


def test_default_arms_are_next_token_and_jepa_with_todays_overrides(tmp_path):
    assert parse_args(["configs/demo.yaml"]).arms == DEFAULT_ARMS == ("next-token", "jepa")
    runs = plan_runs("configs/demo.yaml", ["jepa.lambda_=2"], 2, str(tmp_path))
    assert [(r.arm, r.seed) for r in runs] == [("next-token", 0), ("jepa", 0), ("next-token", 1), ("jepa", 1)]
    assert "jepa.lambda_=0.0" in runs[0].overrides and "jepa.lambda_=2.0" in runs[1].overrides
    stp = plan_runs("configs/demo.yaml", [], 1, str(tmp_path), ("stp", "next-token"), stp_lambda=0.5)
    assert stp[0].arm == "stp" and {"jepa.objective=stp", "jepa.lambda_=0.5"} <= set(stp[0].overrides)
    sigreg = plan_runs("configs/demo.yaml", [], 1, str(tmp_path), ("next-token", "jepa-sigreg"))
    assert load_config("configs/demo.yaml", sigreg[1].overrides).jepa.regularizer == "sigreg"
    assert load_config("configs/demo.yaml", sigreg[0].overrides).jepa.regularizer == "none"


@pytest.mark.parametrize("arms", ["next-token", "jepa,jepa", "next-token,mlm"])
def test_arms_option_refuses_unknown_repeated_or_single_arms(arms, capsys):
    with pytest.raises(SystemExit):
        parse_args(["configs/demo.yaml", "--arms", arms])
    assert "--arms" in capsys.readouterr().err


def test_an_arm_the_config_cannot_run_fails_before_training(tmp_path):
    with pytest.raises(ConfigError, match="jepa.target"):
        plan_runs("configs/demo.yaml", ["jepa.target=ema"], 1, str(tmp_path), ("next-token", "stp"))


def test_summary_and_table_from_known_values():
    base = {"exact_match": [0.10, 0.20, 0.30], "ce": [2.0, 2.2, 2.1]}
    jepa = {"exact_match": [0.15, 0.22, 0.38], "ce": [2.1, 2.3, 2.15]}
    stp = {"exact_match": [0.10, 0.25, 0.30], "ce": [1.9, 2.0, 2.05]}
    results = {
        f"{arm}-seed{s}": {name: values[name][s] if name in values else None for name in METRICS}
        for arm, values in (("next-token", base), ("jepa", jepa), ("stp", stp))
        for s in range(3)
    }
    rows = summarize(_runs(3), results)
    assert list(rows) == ["exact_match", "ce"]  # metrics without values (no checker, ...) are left out
    gains = [0.05, 0.02, 0.08]
    t = mean_std(gains)[0] / (mean_std(gains)[1] / math.sqrt(3))
    assert rows["exact_match"]["jepa"]["p_value"] == pytest.approx(t_sf(t, 2))
    assert rows["exact_match"]["jepa"]["difference"] == pytest.approx(0.05)
    assert rows["ce"]["jepa"]["p_value"] > 0.9  # CE went up in every seed: JEPA is not better
    assert "stp" not in rows["ce"]  # only the arms that ran
    table = format_table(rows, 3)
    assert "| metric (3 seeds) | next-token only | + JEPA | JEPA - next-token | p (JEPA better) |" in table
    assert "| exact match (↑) | 0.2000 ± 0.1000 | 0.2500 ± 0.1179 | +0.0500 |" in table
    assert "| held-out CE (view B) (↓) |" in table

    three = summarize(_runs(3, ARMS), results)
    drops = [0.1, 0.2, 0.05]  # STP's CE is lower in every seed
    t = mean_std(drops)[0] / (mean_std(drops)[1] / math.sqrt(3))
    assert three["ce"]["stp"]["p_value"] == pytest.approx(t_sf(t, 2))
    assert three["ce"]["jepa"] == rows["ce"]["jepa"]  # the third arm changes nothing of the second's
    table = format_table(three, 3, ARMS)
    assert "| exact match (↑) | 0.2000 ± 0.1000 | 0.2500 ± 0.1179 | 0.2167 ± 0.1041 | +0.0500 |" in table


def test_t_distribution_matches_closed_forms_and_tables():
    for t in (-3.0, -0.5, 0.0, 0.3, 2.0, 10.0):
        assert t_sf(t, 1) == pytest.approx(0.5 - math.atan(t) / math.pi, abs=1e-12)  # Cauchy
        assert t_sf(t, 2) == pytest.approx(0.5 - t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    # one-sided critical values from the t table
    for t, dof, p in ((2.920, 2, 0.05), (6.965, 2, 0.01), (2.015, 5, 0.05), (2.764, 10, 0.01), (1.658, 120, 0.05)):
        assert t_sf(t, dof) == pytest.approx(p, abs=2e-4)
    # I_x(a, b) for integer a, b is a binomial tail: P(Bin(a + b - 1, x) >= a)
    for a, b, x in ((2, 3, 0.4), (5, 1, 0.9), (1, 7, 0.05), (30, 40, 0.45)):
        tail = sum(math.comb(a + b - 1, j) * x**j * (1 - x) ** (a + b - 1 - j) for j in range(a, a + b))
        assert betainc(a, b, x) == pytest.approx(tail, rel=1e-10)


def test_paired_t_test_direction_and_undefined_cases():
    assert paired_t_test([1.0, 2.0, 3.5], [0.5, 1.4, 2.0], higher_is_better=True) < 0.1
    assert paired_t_test([1.0, 2.0, 3.5], [0.5, 1.4, 2.0], higher_is_better=False) > 0.9
    assert paired_t_test([0.3, 0.3], [0.1, 0.1], higher_is_better=True) is None  # no variance
    assert paired_t_test([0.3], [0.1], higher_is_better=True) is None  # one seed
    with pytest.raises(ValueError, match="2 treatment values, 1 control"):
        paired_t_test([1.0, 2.0], [1.0], higher_is_better=True)


def test_curve_bands_are_the_seed_mean_and_std_and_the_paired_difference(tmp_path):
    """Bands against numpy on hand-written logs: per step the mean and sample std over seeds, and
    for the difference the arm minus the baseline seed by seed (a step one seed lacks is left out)."""
    import numpy as np

    from megajepa.compare import curve_bands, plot_curves

    ce = {("next-token", 0): [3.0, 2.0, 1.5], ("next-token", 1): [3.2, 2.4, 1.1], ("next-token", 2): [2.9, 2.1, 1.3],
          ("jepa", 0): [3.1, 2.2, 1.6], ("jepa", 1): [3.5, 2.5, 1.4], ("jepa", 2): [3.0, 2.6, 1.9]}  # fmt: skip
    runs = []
    for (arm, seed), values in ce.items():
        out = tmp_path / f"{arm}-{seed}"
        out.mkdir()
        steps = [10, 20, 30] if (arm, seed) != ("jepa", 2) else [10, 20, 30, 40]  # one more step logged
        rows = [{"step": t, "ce": v, **({"jepa": v / 10} if arm == "jepa" else {})} for t, v in zip(steps, values + [9])]
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs.append(Run(arm, seed, str(out), []))
    jepa, base = np.array([ce["jepa", s] for s in range(3)]), np.array([ce["next-token", s] for s in range(3)])
    bands = curve_bands(runs, "ce")
    assert bands["jepa"][0] == [10, 20, 30]
    np.testing.assert_allclose(bands["jepa"][1], jepa.mean(axis=0))
    np.testing.assert_allclose(bands["jepa"][2], jepa.std(axis=0, ddof=1))
    steps, mean, std = curve_bands(runs, "ce", "next-token")["jepa"]
    np.testing.assert_allclose(mean, (jepa - base).mean(axis=0))
    np.testing.assert_allclose(std, (jepa - base).std(axis=0, ddof=1))
    assert set(curve_bands(runs, "ce", "next-token")) == {"jepa"} and set(curve_bands(runs, "jepa")) == {"jepa"}
    plot_curves(runs, str(tmp_path / "curves.png"))
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
