"""One rank of the pretrained-loading tests (run by tests/test_pretrained_loading.py with RANK,
WORLD_SIZE, ... set): loads the checkpoint in --model under ZeRO-3 (CPU, gloo, fp32), either through
megajepa's build_model (megajepa.model.pretrained) or through transformers' from_pretrained as
build_model did before, and writes to --out/rank{r}.json the resident memory before the load and
its high-water mark during it. With --gather, also every parameter gathered whole (rank 0 writes
them to --out/gathered.pt) so that the test can compare them with the checkpoint.
"""

import argparse
import ctypes
import ctypes.util
import json
import os

import deepspeed
import torch
import torch.distributed as dist


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_high_water_mark() -> None:
    """Hand freed heap back (glibc's malloc_trim), then restart VmHWM from the current resident set."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--method", choices=("megajepa", "transformers"), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--gather", action="store_true")
    args = parser.parse_args()

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank = dist.get_rank()
    ds_config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "bf16": {"enabled": False}}
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from megajepa.config import ModelConfig
    from megajepa.model.build import build_model

    vocab = AutoConfig.from_pretrained(args.model).vocab_size
    dist.barrier()
    _reset_high_water_mark()
    before = _status("VmRSS")
    if args.method == "megajepa":
        # range(vocab) stands in for the tokenizer: its length is all build_model asks of it
        model = build_model(
            ModelConfig(config=None, pretrained=args.model, attention="sdpa"), range(vocab), ds_config=ds_config
        )
    else:
        live = HfDeepSpeedConfig(ds_config)  # noqa: F841  (transformers reads it while it lives)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    peak = _status("VmHWM")
    partitions = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.parameters())
    record = {"rank": rank, "rss_before": before, "peak": peak, "partition_bytes": partitions}
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    if args.gather:
        gathered = {}
        for name, param in model.named_parameters():
            with deepspeed.zero.GatheredParameters([param]):
                if rank == 0:
                    gathered[name] = param.data.clone()
        if rank == 0:
            torch.save(gathered, os.path.join(args.out, "gathered.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
