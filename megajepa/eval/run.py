"""`megajepa eval`: held-out generation, CE and JEPA metrics of a checkpoint or an exported model.

    megajepa eval runs/demo --data data/demo/shards/eval [--weights online|ema] [--json out.json]
    torchrun --nproc_per_node 8 -m megajepa.cli eval HF_DIR --data ...      (data-parallel)

The pairs are cut into batches of --batch-pairs; rank r of W takes batches r, r + W, ... so the
numbers do not depend on the number of ranks. Per batch:

  - generation: greedy decoding of view B from the prompt (view A alone), capped at
    --max-new-tokens (default: twice the longest reference, at least 32, no more than the model's
    positions leave after the longest prompt); exact match after
    whitespace normalisation, the task checker recognised from the data or named by --checker
    (megajepa.eval.checkers), whether the generation starts with the reference (the reference's
    --startswith score), and whether decoding stopped by itself;
  - teacher-forced (megajepa.eval.latent): CE and perplexity over view B, the latent loss, the
    cosine of pred(z_a) with matched and mismatched z_b, retrieval of the matched z_b among the
    batch's (only full batches count, so every query has --batch-pairs candidates);
  - collapse (megajepa.jepa.collapse): the spread of z_a and z_b over all the pairs and, with the
    cosines above, the verdict, in words under the table.

z_b comes from the evaluated weights themselves (as with the online target), also for --weights ema.
A model without megajepa.json (not exported by megajepa) is read with the LM's last hidden state
at the last prompt token as z_a and no predictor.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from megajepa import dist
from megajepa.config import JepaConfig
from megajepa.data.tokenizer import pad_token_id
from megajepa.eval.checkers import AUTO, checker_for, startswith
from megajepa.eval.data import EvalPair, data_sources, load_eval_pairs
from megajepa.eval.generation import greedy_generate, normalize
from megajepa.eval.latent import batch_metrics
from megajepa.files import write_text
from megajepa.jepa import collapse
from megajepa.jepa.objective import JepaModel

# name -> (label, higher is better)
METRICS = {
    "exact_match": ("exact match", True),
    "task_accuracy": ("task checker", True),
    "startswith": ("starts with the reference", True),
    "stop_rate": ("stops by itself", True),
    "ce": ("held-out CE (view B)", False),
    "perplexity": ("perplexity", False),
    "jepa_loss": ("JEPA loss", False),
    "cos_matched": ("cos(pred(z_a), z_b) matched", True),
    "cos_mismatched": ("cos(pred(z_a), z_b) mismatched", False),
    "retrieval_top1": ("retrieval top-1", True),
    "retrieval_mean_rank": ("retrieval mean rank", False),
    # megajepa.jepa.collapse over all the pairs: std x sqrt(d) (~1 spread, -> 0 one point), the verdict
    "z_a_std": ("z_a std x sqrt(d)", True),
    "z_b_std": ("z_b std x sqrt(d)", True),
    "collapsed": ("collapsed (1 = yes)", False),
}


@dataclass
class LoadedModel:
    model: JepaModel
    tokenizer: object
    pred_ids: list[int]
    source: dict = field(default_factory=dict)  # what was loaded, for the report


def _jepa_settings(hf_dir: str) -> tuple[JepaConfig, list[int], Optional[str], dict]:
    """(JEPA config, [PRED] ids, predictor file, megajepa.json) of an exported directory."""
    path = os.path.join(hf_dir, "megajepa.json")
    if not os.path.isfile(path):
        return JepaConfig(predictor="identity", k=0), [], None, {}
    with open(path) as f:
        saved = json.load(f)
    predictor = saved["predictor_file"] and os.path.join(hf_dir, saved["predictor_file"])
    jepa = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(JepaConfig), saved["jepa"]))
    return jepa, saved["pred_token_ids"], predictor, saved


def load_hf(hf_dir: str, device, weights: Optional[str] = None) -> LoadedModel:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    jepa, pred_ids, predictor_file, saved = _jepa_settings(hf_dir)
    if weights is not None and saved and saved.get("weights") != weights:
        raise ValueError(f"{hf_dir} holds the {saved.get('weights')} weights, not --weights {weights}")
    tokenizer = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    lm = AutoModelForCausalLM.from_pretrained(hf_dir, dtype="auto", attn_implementation="sdpa", local_files_only=True)
    model = JepaModel(lm, jepa)
    if predictor_file is not None:
        model.predictor.load_state_dict(load_file(predictor_file))
    model.to(device).eval()
    source = {"path": os.path.abspath(hf_dir), "weights": saved.get("weights"), "step": saved.get("step")}
    return LoadedModel(model, tokenizer, pred_ids, source)


def load_model(path: str, device, weights: Optional[str] = None) -> LoadedModel:
    """An exported HF directory, or a checkpoint (exported to a temporary directory first).
    weights: which set of a checkpoint (default online); for an HF directory, the set it must hold."""
    from megajepa.export import export, is_checkpoint

    if not is_checkpoint(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path}: neither a megajepa checkpoint nor a Hugging Face model directory")
        return load_hf(path, device, weights)
    if dist.world_size() > 1:
        raise ValueError(f"{path} is a checkpoint: export it once with `megajepa export` and evaluate the HF directory")
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_hf(export(path, os.path.join(tmp, "hf"), weights=weights or "online"), device)
    loaded.source["path"] = os.path.abspath(path)
    return loaded


def _batches(pairs: Sequence[EvalPair], size: int, rank: int, world: int) -> list[list[EvalPair]]:
    batches = [list(pairs[i : i + size]) for i in range(0, len(pairs), size)]
    return batches[rank::world]


def evaluate_shard(
    loaded: LoadedModel,
    batches: list[list[EvalPair]],
    *,
    batch_pairs: int,
    max_new_tokens: int,
    checker: str,
    sources: Sequence[str],
    progress: bool,
) -> tuple[list[dict], dict]:
    """This rank's per-pair records and summed teacher-forced totals."""
    tokenizer = loaded.tokenizer
    pad_id = pad_token_id(tokenizer)
    records: list[dict] = []
    totals = {"ce_sum": 0.0, "tokens": 0, "latent_sum": 0.0, "pairs": 0, "collapse": 0.0}
    for batch in tqdm(batches, desc="eval", unit="batch", disable=not progress):
        generations = greedy_generate(loaded.model.lm, tokenizer, [p.view_a for p in batch], max_new_tokens)
        metrics = batch_metrics(loaded.model, batch, loaded.pred_ids, pad_id)
        full = len(batch) == batch_pairs
        totals["ce_sum"] += metrics.ce_sum
        totals["tokens"] += metrics.tokens
        totals["latent_sum"] += metrics.latent_sum
        totals["pairs"] += len(batch)
        totals["collapse"] = totals["collapse"] + metrics.collapse
        for i, (pair, gen) in enumerate(zip(batch, generations)):
            task = checker_for(checker, pair.prompt, sources)
            records.append(
                {
                    "sample_id": pair.sample_id,
                    "reference": pair.reference,
                    "generated": gen.text,
                    "exact": normalize(gen.text) == normalize(pair.reference),
                    "checker": task.name if task else None,
                    "task_ok": task.check(gen.text, pair.reference) if task else None,
                    "startswith": startswith(gen.text, pair.reference),
                    "stopped": gen.stopped,
                    "new_tokens": gen.new_tokens,
                    "cos_matched": metrics.cos_matched[i],
                    "cos_mismatched": metrics.cos_mismatched[i] if metrics.cos_mismatched else None,
                    "rank": metrics.ranks[i] if full else None,
                }
            )
    return records, totals


def _mean(values: list) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize(records: list[dict], totals: dict) -> dict:
    """The metrics (METRICS' names) from all ranks' records and totals."""
    ce = totals["ce_sum"] / max(totals["tokens"], 1)
    checked = [r["task_ok"] for r in records if r["task_ok"] is not None]
    ranks = [r["rank"] for r in records if r["rank"] is not None]
    out = {
        "exact_match": _mean([float(r["exact"]) for r in records]),
        "task_accuracy": _mean([float(ok) for ok in checked]),
        "startswith": _mean([float(r["startswith"]) for r in records]),
        "stop_rate": _mean([float(r["stopped"]) for r in records]),
        "ce": ce,
        "perplexity": math.exp(ce) if ce < 700 else float("inf"),
        "jepa_loss": totals["latent_sum"] / max(totals["pairs"], 1),
        "cos_matched": _mean([r["cos_matched"] for r in records]),
        "cos_mismatched": _mean([r["cos_mismatched"] for r in records]),
        "retrieval_top1": _mean([float(r == 1) for r in ranks]),
        "retrieval_mean_rank": _mean([float(r) for r in ranks]),
    }
    spread = collapse.figures(totals["collapse"]) if torch.is_tensor(totals["collapse"]) else {}
    out.update(z_a_std=spread.get("z_a_std"), z_b_std=spread.get("z_b_std"))
    # the verdict with the cosines above (the mismatched one within each batch, as reported)
    judged = collapse.verdict(out)
    out["collapsed"] = None if judged.startswith("n/a") else float(judged.startswith("collapsed"))
    return out


def default_max_new_tokens(pairs: Sequence[EvalPair], positions: Optional[int] = None) -> int:
    """Twice the longest reference, at least 32; with `positions` (the model's
    max_position_embeddings) no more than the longest prompt leaves of them."""
    wanted = max(32, 2 * max(len(p.view_b) for p in pairs))
    if positions is None:
        return wanted
    return max(1, min(wanted, positions - max(len(p.view_a) for p in pairs)))


def evaluate(
    loaded: LoadedModel,
    pairs: Sequence[EvalPair],
    *,
    batch_pairs: int = 32,
    max_new_tokens: Optional[int] = None,
    checker: str = AUTO,
    sources: Sequence[str] = (),
    progress: bool = True,
) -> dict:
    """{"metrics", "settings", "records"}; under torch.distributed every rank calls it with the
    same pairs and every rank gets the full result. checker: a name of megajepa.eval.checkers,
    `auto` (recognised per pair from its prompt and the data files `sources`) or `none`."""
    if batch_pairs < 2:
        raise ValueError(f"--batch-pairs must be at least 2 (retrieval needs candidates), got {batch_pairs}")
    rank, world = dist.rank(), dist.world_size()
    positions = getattr(loaded.model.lm.config, "max_position_embeddings", None)
    max_new_tokens = max_new_tokens or default_max_new_tokens(pairs, positions)
    start = time.perf_counter()
    records, totals = evaluate_shard(
        loaded,
        _batches(pairs, batch_pairs, rank, world),
        batch_pairs=batch_pairs,
        max_new_tokens=max_new_tokens,
        checker=checker,
        sources=sources,
        progress=progress and rank == 0,
    )
    if world > 1:
        gathered = dist.all_gather_object((records, totals))
        records = sorted((r for part, _ in gathered for r in part), key=lambda r: r["sample_id"])
        totals = {k: sum(t[k] for _, t in gathered) for k in totals}
    settings = {
        "pairs": len(records),
        "batch_pairs": batch_pairs,
        "retrieval_queries": sum(r["rank"] is not None for r in records),
        "task_checked": sum(r["task_ok"] is not None for r in records),
        "checkers": dict(Counter(r["checker"] for r in records if r["checker"])),
        "max_new_tokens": max_new_tokens,
        "view_b_tokens": totals["tokens"],
        "ranks": world,
        "seconds": time.perf_counter() - start,
        "model": loaded.source,
    }
    return {"metrics": summarize(records, totals), "settings": settings, "records": records}


def format_table(metrics: dict, settings: dict) -> str:
    """The metrics; the task checker's row names the checker(s) that ran and on how many pairs."""
    ran = ", ".join(f"{name} on {count}" for name, count in sorted(settings["checkers"].items())) or "none ran"
    lines = ["| metric | value |", "|---|---:|"]
    for name, (label, _) in METRICS.items():
        value = metrics.get(name)
        label = f"{label} ({ran})" if name == "task_accuracy" else label
        lines.append(f"| {label} | {'n/a' if value is None else f'{value:.4f}'} |")
    lines.append(f"\ncollapse: {collapse.verdict(metrics)}")
    return "\n".join(lines)


def retrieval_note(settings: dict) -> str:
    """Retrieval counts full batches only (every query among --batch-pairs candidates): why it is n/a."""
    if settings["retrieval_queries"]:
        return f"retrieval among {settings['batch_pairs']} candidates ({settings['retrieval_queries']} queries)"
    return (
        f"retrieval n/a: no batch of --batch-pairs {settings['batch_pairs']} among {settings['pairs']} pairs "
        f"(pass --batch-pairs {settings['pairs']} or fewer)"
    )


def _init_distributed() -> tuple[int, int, torch.device]:
    """A process group when launched by torchrun / deepspeed with several ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.rank(), world, device


def main(args) -> int:
    """`megajepa eval` (arguments: megajepa.cli)."""
    rank, _, device = _init_distributed()
    loaded = load_model(args.model, device, args.weights)
    pairs = load_eval_pairs(args.data, loaded.tokenizer, args.limit)
    result = evaluate(
        loaded,
        pairs,
        batch_pairs=args.batch_pairs,
        max_new_tokens=args.max_new_tokens,
        checker=args.checker,
        sources=data_sources(args.data),
        progress=args.progress,
    )
    if rank == 0:
        settings = result["settings"]
        print(format_table(result["metrics"], settings))
        print(
            f"\n{settings['pairs']} pairs on {settings['ranks']} rank(s) in {settings['seconds']:.1f} s; "
            f"{retrieval_note(settings)}; at most {settings['max_new_tokens']} new tokens"
        )
        if args.json:
            report = {"metrics": result["metrics"], "settings": settings, "data": args.data}
            write_text(args.json, json.dumps(report, indent=2))
        if args.generations:
            write_text(args.generations, "".join(json.dumps(r) + "\n" for r in result["records"]))
    dist.destroy_process_group()
    return 0
