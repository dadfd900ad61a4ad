"""megajepa.train.step.train_step on a stand-in engine: order of calls, agreement, host reads."""

import pytest
import torch

from megajepa.jepa.collapse import statistics
from megajepa.jepa.objective import JepaOutput
from megajepa.model.attention import MASK_KEYS
from megajepa.train.step import train_step


class FakeEngine:
    """Records what the step asks of a DeepSpeed engine; the loss of micro-batch i is losses[i]."""

    def __init__(self, losses, accumulation, router_aux=None):
        self.losses, self.accumulation, self.device = losses, accumulation, torch.device("cpu")
        self.router_aux = router_aux  # per micro-batch, as a MoE model's output has it
        self.calls, self.applied = [], 0

    def gradient_accumulation_steps(self):
        return self.accumulation

    def __call__(self, batch, step, target_embeddings=None):
        i = len([c for c in self.calls if c[0] == "forward"])
        self.calls.append(("forward", step, target_embeddings))
        loss = torch.tensor(self.losses[i], requires_grad=True)
        z = torch.arange(6.0).reshape(3, 2) + i
        aux = None if self.router_aux is None else torch.tensor(self.router_aux[i])
        return JepaOutput(
            loss=loss, ce=loss.detach() * 0.5, jepa=loss.detach() * 0.25, lambda_=1.0, z_a=z, z_b=-z, router_aux=aux
        )

    def backward(self, loss, scale_wrt_gas=True):
        self.calls.append(("backward",))

    def step(self):
        self.calls.append(("step",))
        if sum(c[0] == "step" for c in self.calls) % self.accumulation == 0:
            self.applied += 1


class FakeTeacher:
    """z_b of a pair: 7 + its flat read index in the rows it was given."""

    def __init__(self):
        self.updates, self.encoded_rows = [], []

    def encode(self, batch):
        self.encoded_rows.append(batch["teacher_input_ids"].shape)
        return (7.0 + batch["zb_index"].float())[:, None].expand(-1, 2)

    def update(self, step):
        self.updates.append(step)


def micro_batch(tokens, pairs=2):
    """Counts, and `pairs` teacher rows of `tokens` columns, each pair read at its row's end."""
    rows = {f"teacher_{key}": torch.zeros(pairs, tokens, dtype=torch.long) for key in ("input_ids", *MASK_KEYS)}
    return {
        "computed_tokens": torch.tensor(tokens), "useful_tokens": torch.tensor(tokens - 1), "num_pairs": torch.tensor(2),
        "zb_index": torch.arange(1, pairs + 1) * tokens - 1, "jepa_pairs": torch.arange(pairs), **rows,
    }  # fmt: skip


def test_accumulates_then_updates_and_follows_with_the_ema():
    engine, teacher = FakeEngine([1.0, 3.0], accumulation=2), FakeTeacher()
    result = train_step(engine, teacher, [micro_batch(10), micro_batch(20, pairs=3)], step=4, flags={"stop": False})
    assert [c[0] for c in engine.calls] == ["forward", "backward", "step", "forward", "backward", "step"]
    # one teacher forward for the step, rows padded to the wider micro-batch's 20 columns; each
    # micro-batch gets its own pairs' z_b, read at the end of each of its rows
    assert teacher.encoded_rows == [(5, 20)]
    targets = [c[2][:, 0] for c in engine.calls if c[0] == "forward"]
    assert [t.tolist() for t in targets] == [[7 + 9, 7 + 29], [7 + 59, 7 + 79, 7 + 99]]
    assert all(c[1] == 4 for c in engine.calls if c[0] == "forward")
    assert engine.applied == 1 and teacher.updates == [5]  # the EMA after optimizer step 5
    assert result.updated and result.flags == {"nonfinite": False, "stop": False}
    assert (result.loss.item(), result.ce.item(), result.jepa.item()) == (2.0, 1.0, 0.5)
    assert result.counts == {"computed_tokens": 30.0, "useful_tokens": 28.0, "num_pairs": 4.0}


def test_router_aux_is_logged_as_the_mean_over_micro_batches():
    engine = FakeEngine([1.0, 3.0], accumulation=2, router_aux=[2.0, 5.0])
    result = train_step(engine, None, [micro_batch(10), micro_batch(20)], step=0)
    assert result.device_metrics["router_aux"].item() == 3.5
    plain = train_step(FakeEngine([1.0, 3.0], accumulation=2), None, [micro_batch(10), micro_batch(20)], step=0)
    assert "router_aux" not in plain.device_metrics


@pytest.mark.parametrize("bad", [0, 1])
def test_a_non_finite_loss_in_any_micro_batch_skips_the_update(bad):
    losses = [1.0, 1.0]
    losses[bad] = float("nan")
    engine, teacher = FakeEngine(losses, accumulation=2), FakeTeacher()
    result = train_step(engine, teacher, [micro_batch(10), micro_batch(20)], step=0, flags={"stop": True})
    assert not result.updated and result.flags == {"nonfinite": True, "stop": True}
    assert [c[0] for c in engine.calls].count("step") == 1  # the accumulating one only
    assert engine.applied == 0 and teacher.updates == []


def test_refuses_a_wrong_number_of_micro_batches():
    with pytest.raises(ValueError, match="1 micro-batches for 2 accumulation steps"):
        train_step(FakeEngine([1.0], 2), None, [micro_batch(5)], step=0)


def test_one_host_read_per_step(monkeypatch):
    """The agreement's one read is the step's only wait for the device: no .item(), bool() or
    .tolist() elsewhere (on a GPU each would stall the host until the device catches up)."""
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _name=name, _original=original):
            if self.device.type != "cpu" or self.dim() != 0 or self.dtype != torch.int64:  # CPU counts are free
                reads.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counting)
    engine = FakeEngine([1.0, 2.0, 3.0], accumulation=3)
    result = train_step(engine, FakeTeacher(), [micro_batch(4)] * 3, step=0, flags={"stop": False})
    assert result.updated
    assert reads == ["tolist"], reads
    # the collapse statistics stay on the device: those of the step's three micro-batches together
    z = torch.cat([torch.arange(6.0).reshape(3, 2) + i for i in range(3)])
    assert torch.allclose(result.collapse, statistics(z, -z))


@pytest.mark.gpu
def test_sync_debug_errors_on_a_host_read_inside_the_block_only():
    from megajepa.train.step import sync_debug

    x = torch.ones(3, device="cuda")
    with sync_debug("error"), pytest.raises(RuntimeError, match="synchroniz"):
        x.sum().item()
    assert x.sum().item() == 3.0  # the previous mode is back
