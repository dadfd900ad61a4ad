"""The CE on the LM head under DeepSpeed ZeRO-3, 2 ranks in real processes (gloo on CPU), with a
Llama-3-sized vocabulary (128,256) and label counts that differ across ranks and straddle a
chunk boundary: every rank issues the same collectives, and the CE and the reduced gradients
equal the dense full-logits CE of a plain model's own forward (tests/_head_worker.py records)."""

import pytest
import torch
import torch.nn.functional as F
from _head_worker import model_spec
from _ranks import run_worker
from transformers import LlamaConfig, LlamaForCausalLM

from megajepa.model.attention import MASK_KEYS, attention_mask
from megajepa.model.head import MAX_LOGIT_BYTES

LLAMA3_VOCAB = 128_256
CHUNK = MAX_LOGIT_BYTES // (4 * LLAMA3_VOCAB)  # 523 tokens of fp32 logits per chunk
LABELS = [f"{CHUNK - 120},{CHUNK + 80}", f"{CHUNK + 80},{CHUNK - 120}"]  # per step: rank 0's, rank 1's


def run_ranks(out, world: int, *args: str) -> list[dict]:
    run_worker("_head_worker.py", out, world, *args, timeout=900.0)
    return [torch.load(out / f"rank{r}.pt", weights_only=False, map_location="cpu") for r in range(world)]


def dense_ce(weights: dict, batch: dict, vocab: int):
    """-> (CE, {name: gradient}) of a plain model with `weights` on `batch`: the model's own forward
    over the packed rows (all logits at once), then the mean CE over the labelled tokens."""
    spec = {k: v for k, v in model_spec(vocab).items() if k != "model_type"}
    lm = LlamaForCausalLM(LlamaConfig(attn_implementation="sdpa", **spec))
    with torch.no_grad():
        for name, param in lm.named_parameters():
            param.copy_(weights["lm." + name])
    rows = {key: batch[key] for key in ("input_ids", *MASK_KEYS)}
    logits = lm(input_ids=rows["input_ids"], position_ids=rows["position_ids"], attention_mask=attention_mask(rows, lm)).logits
    ce = F.cross_entropy(logits.flatten(0, 1)[batch["ce_index"]].float(), batch["ce_targets"])
    ce.backward()
    return ce.detach(), {"lm." + name: p.grad for name, p in lm.named_parameters()}


def check_against_dense(records: list[dict], **tolerance) -> None:
    vocab = records[0]["vocab"]
    for step in range(len(records[0]["steps"])):
        entries = [record["steps"][step] for record in records]
        dense = [dense_ce(entry["weights"], entry["batch"], vocab) for entry in entries]
        for entry, (ce, _) in zip(entries, dense):
            torch.testing.assert_close(entry["ce"], ce, **tolerance)
            torch.testing.assert_close(entry["eval_ce"], ce, **tolerance)
        # DeepSpeed averages the ranks' gradients; every rank holds the same reduced ones
        for name in dense[0][1]:
            expected = sum(grads[name] for _, grads in dense) / len(dense)
            for entry in entries:
                torch.testing.assert_close(entry["grads"][name], expected, **tolerance, msg=lambda m: f"step {step} {name}: {m}")


def check_same_collectives(records: list[dict]) -> None:
    for step in range(len(records[0]["steps"])):
        first, second = (record["steps"][step] for record in records)
        for key in ("train_calls", "eval_calls"):
            assert first[key] == second[key], f"step {step}, {key}: the ranks issued different collectives"
            assert any("ALLGATHER" in name for name, _ in first[key])  # the recorder sees the gathers (ALLGATHER_BASE on torch 2.15)
        assert first["head_partitioned"] and second["head_partitioned"]


@pytest.fixture(scope="module")
def llama3_vocab(tmp_path_factory):
    return run_ranks(tmp_path_factory.mktemp("head128k"), 2, "--vocab", str(LLAMA3_VOCAB), "--labels", *LABELS)


def test_label_counts_straddle_a_chunk_boundary(llama3_vocab):
    for step in range(len(LABELS)):
        counts = sorted(record["steps"][step]["labels"] for record in llama3_vocab)
        assert counts[0] <= CHUNK < counts[1]  # one chunk on one rank, two on the other


def test_every_rank_issues_the_same_collectives(llama3_vocab):
    check_same_collectives(llama3_vocab)


def test_ce_and_gradients_equal_the_dense_full_logits_ce(llama3_vocab):
    check_against_dense(llama3_vocab)
    for record in llama3_vocab:  # no Liger on the CPU: the chunked path, in eval and training
        assert all(entry["paths"] == ["chunked", "chunked"] for entry in record["steps"])
        assert record["accum_dtypes"] == []


def test_outside_a_gathering_module_the_ce_refuses_the_partitioned_head(llama3_vocab):
    for record in llama3_vocab:
        assert "partitioned (ZeRO-3)" in record["outside_error"]


def test_liger_fused_ce_under_zero3(tmp_path):
    """Liger's fused kernel (Triton's interpreter on the CPU, a small vocabulary) on the gathered
    head weight: it runs on every rank, with fp32 accumulation, and agrees with the dense CE."""
    pytest.importorskip("liger_kernel")
    records = run_ranks(tmp_path, 2, "--vocab", "1000", "--labels", "30,90", "--liger-on-cpu")
    check_same_collectives(records)
    check_against_dense(records)
    for record in records:
        assert all(entry["paths"] == ["liger", "liger"] for entry in record["steps"])
        assert record["accum_dtypes"] == ["torch.float32"] * 2


@pytest.mark.gpu
def test_liger_fused_ce_under_zero3_on_gpu(tmp_path):
    """On CUDA, ZeRO-3 (one rank, NCCL) at the 128k vocabulary: the fused path runs on the gathered
    head weight, in eval and training, with fp32 accumulation, and agrees with the dense CE."""
    pytest.importorskip("liger_kernel")
    (record,) = run_ranks(tmp_path, 1, "--vocab", str(LLAMA3_VOCAB), "--labels", str(3 * CHUNK))
    assert all(entry["paths"] == ["liger", "liger"] and entry["head_partitioned"] for entry in record["steps"])
    assert record["accum_dtypes"] == ["torch.float32"] * 2
    check_against_dense([record], rtol=1e-4, atol=1e-5)  # the GPU's fp32 against the CPU's
