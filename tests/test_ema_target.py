"""The sharded EMA teacher under DeepSpeed ZeRO-3, in real processes (gloo on CPU).

tests/_ema_worker.py trains a tiny Llama JepaModel for a few steps with two teachers (the flat
per-sub-group layout and the per-parameter fallback) and records what they hold; here a plain
single-process reference EMA of the online model's fp32 master weights, and a plain model loaded
with it, say what they should hold.
"""

import dataclasses
import math
import shutil

import pytest
import torch
from _ema_worker import EMA, FROZEN, JEPA, MODEL, PRED_ID, VOCAB
from _ranks import run_worker
from _shards import pair_record
from _train_utils import remark_complete
from transformers import LlamaConfig, LlamaForCausalLM

from megajepa.cli import main
from megajepa.config import DataConfig, EmaConfig
from megajepa.data.layout import Layout
from megajepa.jepa.ema_target import momentum_at, stack_teacher_rows
from megajepa.train.deepspeed_json import teacher_config
from megajepa.train.ema_checkpoint import EmaShardsUnusable, consolidate_ema, ema_pieces
from megajepa.jepa.objective import JepaModel

STEPS = 4


def run_ranks(out, world: int, *args: str) -> list[dict]:
    """tests/_ema_worker.py on `world` ranks; each rank's record."""
    run_worker("_ema_worker.py", out, world, *args, timeout=600.0)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def reference_emas(masters: list[dict], total_steps: int) -> list[dict]:
    """The EMA after 0, 1, ... steps, in one process, from the gathered fp32 master weights."""
    ema = {name: w.clone() for name, w in masters[0].items()}
    history = [ema]
    for step in range(1, len(masters)):
        m = momentum_at(EMA, step - 1, total_steps)
        ema = {name: ema[name] * m + masters[step][name] * (1.0 - m) for name in ema}
        history.append(ema)
    return history


def reference_z_b(weights: dict, batch: dict) -> torch.Tensor:
    spec = {k: v for k, v in MODEL.items() if k != "model_type"}
    model = JepaModel(LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, attn_implementation="sdpa", **spec)), JEPA)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(weights[name])
    return model.encode_targets(batch)


def assert_weights_close(actual: dict, expected: dict, names=None) -> None:
    """Equal to fp32 rounding (torch's default float32 tolerances), parameter by parameter."""
    for name in names or expected:
        torch.testing.assert_close(actual[name], expected[name], msg=lambda m: f"{name}: {m}")


@pytest.fixture(scope="module")
def zero3_two_ranks(tmp_path_factory):
    """fp32, online persistence threshold 100 (the norm weights persist), several optimizer sub-groups."""
    return run_ranks(tmp_path_factory.mktemp("zero3"), 2, "--steps", str(STEPS))


@pytest.fixture(scope="module")
def reference(zero3_two_ranks):
    return reference_emas(zero3_two_ranks[0]["masters"], STEPS)


def test_teacher_equals_reference_ema_after_every_step(zero3_two_ranks, reference):
    record = zero3_two_ranks[0]
    assert record["layouts"]["auto"] == "flat" and record["sub_groups"] > 1
    for step, expected in enumerate(reference):
        assert_weights_close(record["teacher"]["auto"][step], expected)
    # not vacuous: the online model trained and the teacher moved with it, but for the frozen weight
    first, last = record["masters"][0], reference[-1]
    assert [name for name in first if torch.equal(first[name], record["masters"][-1][name])] == [FROZEN]
    assert all(not torch.equal(first[name], last[name]) for name in first if name != FROZEN)
    assert [u["momentum"] for u in record["updates"]["auto"]] == [momentum_at(EMA, s, STEPS) for s in range(STEPS)]


def _gathers(calls: list[str]) -> int:
    """All-gathers among the collectives' names (ALLGATHER, or ALLGATHER_BASE with torch 2.15)."""
    return sum("ALLGATHER" in name for name in calls)


def test_update_communicates_nothing(zero3_two_ranks):
    for record in zero3_two_ranks:
        assert record["update_calls"] == [[]] * STEPS
        # the counter sees collectives: every teacher forward all-gathers parameters
        assert all(_gathers(calls) for calls in record["encode_calls"])


def test_persistent_online_parameters_are_refreshed_in_the_teacher(zero3_two_ranks, reference):
    record = zero3_two_ranks[0]
    persistent = record["online_persistent"]
    assert persistent and all("norm" in name for name in persistent)
    assert record["teacher_persistent"] == []
    for step in range(1, STEPS + 1):  # gathered after a forward that would have left stale copies
        assert_weights_close(record["teacher"]["auto"][step], reference[step], persistent)
    assert all(not torch.equal(reference[0][n], reference[-1][n]) for n in persistent)


def test_flat_and_per_parameter_layouts_agree_exactly(zero3_two_ranks):
    for record in zero3_two_ranks:
        assert record["layouts"] == {"auto": "flat", "per_parameter": "per_parameter"}
        assert record["warnings"] == []
        for flat, per_param in zip(record["teacher"]["auto"], record["teacher"]["per_parameter"]):
            assert flat.keys() == per_param.keys()
            assert all(torch.equal(flat[name], per_param[name]) for name in flat)
        for flat, per_param in zip(record["z_b"]["auto"], record["z_b"]["per_parameter"]):
            assert torch.equal(flat, per_param)


def test_encode_gives_z_b_of_the_teacher_weights(zero3_two_ranks, reference):
    for record in zero3_two_ranks:
        for step in range(STEPS):  # at step 0, reference[0] is the online model itself
            expected = reference_z_b(reference[step], record["batches"][step])
            torch.testing.assert_close(record["z_b"]["auto"][step], expected, atol=1e-5, rtol=1e-5)


def test_one_teacher_forward_per_step_gives_each_micro_batchs_z_b(zero3_two_ranks):
    for record in zero3_two_ranks:
        assert len(set(record["micro_widths"])) > 1  # rows of other widths: padded when stacked
        for stacked, alone in zip(record["stacked_z_b"], record["per_micro_z_b"], strict=True):
            torch.testing.assert_close(stacked, alone, atol=1e-6, rtol=1e-6)
    # the teacher's all-gathers: as many for a step of 3 micro-batches as for 1, and the same on
    # both ranks although their pairs differ; one forward per micro-batch gathered 3 times as much
    gathers = [{n: _gathers(calls) for n, calls in r["stacked_calls"].items()} for r in zero3_two_ranks]
    assert gathers[0] == gathers[1] and gathers[0][1] == gathers[0][3] > 0
    assert zero3_two_ranks[0]["stacked_calls"][3] == zero3_two_ranks[1]["stacked_calls"][3]
    assert _gathers(zero3_two_ranks[0]["per_micro_calls"]) == 3 * gathers[0][1]


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_stacked_teacher_rows_read_each_micro_batchs_pairs(pooling):
    """In one process, on a plain model: the stacked rows' z_b, split, is each micro-batch's own."""
    jepa = dataclasses.replace(JEPA, pooling=pooling)
    spec = {k: v for k, v in MODEL.items() if k != "model_type"}
    torch.manual_seed(0)
    model = JepaModel(LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, attn_implementation="sdpa", **spec)), jepa)
    layout = Layout(DataConfig(shards="", tokenizer="", row_length=48, max_length=0), jepa, [PRED_ID], 0)
    g = torch.Generator().manual_seed(0)

    def records(n):
        lengths = torch.randint(2, 14, (n, 2), generator=g).tolist()
        return [{"sample_id": i, **pair_record(torch.randint(0, PRED_ID, (a,), generator=g).numpy(),
                                               torch.randint(0, PRED_ID, (b,), generator=g).numpy())}
                for i, (a, b) in enumerate(lengths)]  # fmt: skip

    micro = [layout(records(n)) for n in (3, 9, 1)]
    assert len({b["teacher_input_ids"].shape[1] for b in micro}) > 1  # padded when stacked
    rows, pairs = stack_teacher_rows(micro)
    assert pairs == [b["jepa_pairs"].numel() for b in micro]
    for stacked, batch in zip(model.encode_targets(rows).split(pairs), micro, strict=True):
        torch.testing.assert_close(stacked, model.encode_targets(batch), atol=1e-6, rtol=1e-6)


def test_update_acts_only_after_an_optimizer_step(zero3_two_ranks):
    record = zero3_two_ranks[0]
    assert all(u["updated"] for u in record["updates"]["auto"])
    assert record["repeat_update"]["updated"] is False


def test_save_load_round_trip_restores_ema_and_step(zero3_two_ranks):
    for rank, record in enumerate(zero3_two_ranks):
        assert record["moved_update"]["updated"] and record["moved_differs"]  # the EMA moved after the save
        assert record["pieces_equal"]  # a reshard from the checkpoint's shards restores it too
        assert record["saved_step"] == record["loaded_step"] == STEPS
        assert record["loaded_equal"]
        loaded, saved = record["loaded_teacher"], record["teacher"]["auto"][STEPS]
        assert all(torch.equal(loaded[name], saved[name]) for name in saved)
        assert record["checkpoint_files"] == ["ema_rank0.pt", "ema_rank1.pt"]  # no temporary file left
        assert f"ema_rank{rank}.pt" in record["layout_mismatch_error"]
        assert "no-checkpoint" in record["missing_error"]
        (warning,) = record["schedule_warnings"]
        assert f"over {STEPS} steps" in warning and f"over {STEPS + 1} steps" in warning


@pytest.mark.parametrize("new_world", [1, 3, 4])
def test_ema_pieces_are_the_new_partitions_of_deepspeeds_consolidation(zero3_two_ranks, new_world):
    """Each rank of another world size reads its own partitions (ZeRO-3: ceil(numel / world) per
    rank, zero-padded) out of the 2-rank shards; together they are zero_to_fp32's whole EMA."""
    tag_dir = zero3_two_ranks[0]["ds_checkpoint"]
    whole = consolidate_ema(tag_dir, 2)
    trained = [name for name in zero3_two_ranks[0]["masters"][0] if name != FROZEN]  # tied weights once
    parts = {name: [] for name in trained}
    for rank in range(new_world):
        wanted = {}
        for name in trained:
            n = math.ceil(whole[name].numel() / new_world)
            wanted[name] = (rank * n, (rank + 1) * n)
        pieces = ema_pieces(tag_dir, 2, wanted)
        for name, (start, stop) in wanted.items():
            assert pieces[name].shape == (stop - start,)
            parts[name].append(pieces[name])
    for name in trained:
        flat = torch.cat(parts[name])
        numel = whole[name].numel()
        assert torch.equal(flat[:numel], whole[name].reshape(-1)), name
        assert not flat[numel:].any()  # ZeRO-3's padding
    assert not torch.equal(whole[trained[0]], zero3_two_ranks[0]["masters"][-1][trained[0]])  # the EMA, not the weights


def test_ema_pieces_read_only_the_shards_that_hold_them(zero3_two_ranks, tmp_path):
    """Rank 0 of 4 needs the first quarter of each parameter: all in the saved rank 0's shard."""
    tag_dir = tmp_path / "t"
    shutil.copytree(zero3_two_ranks[0]["ds_checkpoint"], tag_dir)
    whole = consolidate_ema(str(tag_dir), 2)
    (tag_dir / "ema_rank1.pt").unlink()
    trained = [name for name in zero3_two_ranks[0]["masters"][0] if name != FROZEN]
    wanted = {name: (0, math.ceil(whole[name].numel() / 4)) for name in trained}
    pieces = ema_pieces(str(tag_dir), 2, wanted)
    assert all(torch.equal(pieces[name], whole[name].reshape(-1)[:stop]) for name, (_, stop) in wanted.items())
    with pytest.raises(EmaShardsUnusable, match="ema_rank1.pt"):  # the whole EMA needs every shard
        consolidate_ema(str(tag_dir), 2)


def test_universal_command_converts_a_complete_checkpoint_and_refuses_others(zero3_two_ranks, tmp_path, capsys):
    """`megajepa universal`, run before a launch at another world size: DeepSpeed's converter
    writes each trained parameter's fp32 master whole, which is what the online model held."""
    tag_dir = tmp_path / "step00000004"
    shutil.copytree(zero3_two_ranks[0]["ds_checkpoint"], tag_dir)
    assert main(["universal", str(tag_dir)]) == 2
    assert "not a complete checkpoint: no complete.json" in capsys.readouterr().err
    (tag_dir / "complete.json").write_text("{}")
    remark_complete(tag_dir)
    assert main(["universal", str(tag_dir), "--workers", "2"]) == 0
    masters = zero3_two_ranks[0]["masters"][-1]
    for name in masters:
        if name != FROZEN:
            saved = torch.load(tag_dir / "universal" / "zero" / name / "fp32.pt", weights_only=True)  # flat, ZeRO-3
            assert torch.equal(saved, masters[name].reshape(-1)), name


def local_elements(weights: dict, world: int, trained_only: bool) -> int:
    return sum(math.ceil(w.numel() / world) for n, w in weights.items() if not (trained_only and n == FROZEN))


def test_memory_report_counts_this_ranks_shards(zero3_two_ranks):
    weights = zero3_two_ranks[0]["masters"][0]
    for record in zero3_two_ranks:  # the EMA leaves out the frozen parameter, the teacher has it
        assert record["memory"] == {
            "ema": 4 * local_elements(weights, 2, trained_only=True),
            "teacher": 4 * local_elements(weights, 2, trained_only=False),
        }


def test_single_rank_bf16_teacher_rounds_the_fp32_ema(tmp_path):
    (record,) = run_ranks(tmp_path, 1, "--steps", "2", "--precision", "bf16")
    assert record["layouts"]["auto"] == "flat"
    reference = reference_emas(record["masters"], 2)
    for step, expected in enumerate(reference):
        rounded = {name: w.to(torch.bfloat16).float() for name, w in expected.items()}
        assert all(torch.equal(record["teacher"]["auto"][step][n], rounded[n]) for n in rounded)
    weights = record["masters"][0]
    assert record["memory"] == {
        "ema": 4 * local_elements(weights, 1, trained_only=True),
        "teacher": 2 * local_elements(weights, 1, trained_only=False),
    }
    assert record["update_calls"] == [[], []]


def test_zero_stage_2_falls_back_to_whole_parameters(tmp_path):
    (record,) = run_ranks(tmp_path, 1, "--steps", "2", "--stage", "2")
    assert record["layouts"] == {"auto": "per_parameter", "per_parameter": "per_parameter"}
    (warning,) = record["warnings"]
    assert warning.endswith("per parameter, not per flat sub-group: ZeRO stage 2 keeps whole parameters on every rank")
    for step, expected in enumerate(reference_emas(record["masters"], 2)):
        assert_weights_close(record["teacher"]["auto"][step], expected)
    assert record["update_calls"] == [[], []]


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_momentum_schedule_endpoints_and_monotonicity(schedule):
    cfg = EmaConfig(schedule=schedule, momentum_start=0.99, momentum_end=0.999)
    values = [momentum_at(cfg, step, 50) for step in range(60)]
    assert values[0] == 0.99
    assert values[50] == values[59] == (0.99 if schedule == "constant" else pytest.approx(0.999))
    assert all(a <= b for a, b in zip(values, values[1:]))
    if schedule == "cosine":
        assert values[25] == pytest.approx((0.99 + 0.999) / 2)
        assert values[1] - values[0] < values[26] - values[25]  # flat at the start, steep mid-way


def test_momentum_schedule_rejects_bad_input():
    with pytest.raises(ValueError, match="jepa.ema.schedule"):
        momentum_at(EmaConfig(schedule="step"), 0, 10)
    with pytest.raises(ValueError, match="total_steps"):
        momentum_at(EmaConfig(), 0, 0)


def test_teacher_config_has_no_optimizer_and_no_persistent_parameters():
    online = {
        "train_batch_size": 8,
        "optimizer": {"type": "AdamW"},
        "scheduler": {"type": "WarmupLR"},
        "tensorboard": {"enabled": True},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 100_000, "offload_optimizer": {}},
    }
    teacher = teacher_config(online)
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0, "overlap_comm": False, "zero_hpz_partition_size": 1}
    assert teacher == {"train_batch_size": 8, "zero_optimization": zero}
    assert online["zero_optimization"]["stage3_param_persistence_threshold"] == 100_000  # not modified
    assert teacher_config({"zero_optimization": {"stage": 2}})["zero_optimization"] == {"stage": 0}
