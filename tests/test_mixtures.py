"""Mixtures of sources and token-budget micro-batches on real MDS shards (schema v2 columns):
epoch composition, source bookkeeping, budget cuts, resumption inside a window, two ranks."""

import json
import os
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from megajepa.data.loader import RECORD_LENGTHS_FILE, build_loader, plan_windows, record_costs
from megajepa.data.mixture import Source
from megajepa.jepa.objective import JepaModel
from megajepa.model.head import per_source_ce
from _mixture_shards import cost, make_layout, random_records, summary_collate, write_records
from _shards import tiny_tokenizer
from _tiny_chat import tiny_llama
from _ranks import run_worker

LAYOUT = make_layout()
K = 1
WORKER = Path(__file__).with_name("_mixture_worker.py")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Source A: 40 pairs; source B: 30 CE-only texts. Returns {name: (dir, records)}."""
    root = tmp_path_factory.mktemp("mix")
    tokenizer = tiny_tokenizer()
    made = {}
    for name, kind, count, seed in (("A", "pair", 40, 0), ("B", "text", 30, 1)):
        records = random_records(count, kind=kind, seed=seed, name=name)
        made[name] = (write_records(str(root / name), records, tokenizer), records)
    return made


def record_of(corpus, source_string):
    """The record a batch's `source` string names (NAME:LINE)."""
    name, line = source_string.split(":")
    return corpus[name][1][int(line) - 1]


def global_id(corpus, source_string, order=("A", "B")):
    """streaming's global index: the sources' records one after the other, in list order."""
    name, line = source_string.split(":")
    offset = sum(len(corpus[n][1]) for n in order[: order.index(name)])
    return offset + int(line) - 1


def mixture_loader(corpus, weights, **kwargs):
    sources = [Source(shards=corpus[name][0], name=name, **w) for name, w in weights.items()]
    options = dict(batch_pairs=4, layout=LAYOUT, collate=summary_collate, record_ids=True, seed=5)
    return build_loader(sources=sources, **{**options, **kwargs})


def test_repeat_and_choose_shape_the_epoch(corpus):
    loader = mixture_loader(corpus, {"A": {"repeat": 2}, "B": {"choose": 12}})
    batches = list(loader.iter_epoch())
    assert len(batches) == (2 * 40 + 12) // 4  # 92 records, no partial batch
    seen = Counter(s for b in batches for s in b["sources"])
    assert sorted(seen.values()) == [1] * 12 + [2] * 40
    assert {s for s in seen if s.startswith("A")} == {f"A:{i}" for i in range(1, 41)}
    assert len({s for s in seen if s.startswith("B")}) == 12
    for batch in batches:
        names = [s.split(":")[0] for s in batch["sources"]]
        assert batch["source_index"].tolist() == [("A", "B").index(n) for n in names]
        assert batch["sample_ids"].tolist() == [global_id(corpus, s) for s in batch["sources"]]
        records = [record_of(corpus, s) for s in batch["sources"]]
        pairs = [names.count(n) if n == "A" else 0 for n in ("A", "B")]
        tokens = [sum(len(r["full"]) for r, n in zip(records, names) if n == name) for name in ("A", "B")]
        assert batch["source_records"].tolist() == [names.count("A"), names.count("B")]
        assert batch["source_pairs"].tolist() == pairs  # B's texts are CE-only: no pairs
        assert batch["source_tokens"].tolist() == tokens
    assert loader.source_names == ["A", "B"]


def test_per_stream_mixing_draws_each_batch_from_one_source(corpus):
    loader = mixture_loader(corpus, {"A": {}, "B": {}}, mixing="per_stream")
    kinds = [set(b["source_index"].tolist()) for b in loader.iter_epoch()]
    assert all(len(k) == 1 for k in kinds) and set().union(*kinds) == {0, 1}


def test_proportions_follow_the_weights(corpus):
    loader = mixture_loader(corpus, {"A": {"proportion": 3.0}, "B": {"proportion": 1.0}}, batch_pairs=2)
    counts = Counter(i for b in loader.iter_epoch() for i in b["source_index"].tolist())
    total = counts[0] + counts[1]
    assert abs(counts[0] / total - 0.75) <= 1 / total  # streaming rounds each source's share


def test_mixture_errors_name_the_source(corpus, tmp_path):
    with pytest.raises(ValueError, match=r"data\.sources\[1\]: when one source has a proportion"):
        mixture_loader(corpus, {"A": {"proportion": 1.0}, "B": {}})
    with pytest.raises(ValueError, match=r"data\.sources\[0\] \(A\): give at most one of proportion, repeat, choose"):
        mixture_loader(corpus, {"A": {"repeat": 1.0, "choose": 3}, "B": {}})
    with pytest.raises(FileNotFoundError, match="nowhere: shard directory does not exist"):
        build_loader(sources=[Source(shards=str(tmp_path / "nowhere"))], batch_pairs=4, layout=LAYOUT)


def batch_records(corpus, batch):
    """The corpus records of a batch, in its record order."""
    sources = batch["source_index"].tolist()
    return [corpus["AB"[s]][1][sid - (40 if s else 0)] for s, sid in zip(sources, batch["sample_ids"].tolist())]


def test_text_records_packed_beside_pairs_carry_ce_only(corpus):
    """Through the real layout: B's texts get no JEPA term and labels on every token; each
    labelled token's source (ce_source) counts each source's labelled tokens as the records
    define them."""
    loader = mixture_loader(corpus, {"A": {}, "B": {}}, collate=None, batch_pairs=8)
    for batch in islice(loader.iter_epoch(), 4):
        sources = batch["source_index"].tolist()
        assert set(batch["jepa_pairs"].tolist()) == {j for j, s in enumerate(sources) if s == 0}
        assert set(sources) == {0, 1}  # both kinds share the batch's rows
        records = batch_records(corpus, batch)
        # response labels for a pair (from the assistant header on), every next token for a text
        want = [len(r["full"]) - r["prompt_len"] if s == 0 else len(r["full"]) - 1 for r, s in zip(records, sources)]
        assert batch["ce_source"].shape == batch["ce_targets"].shape
        counts = torch.bincount(batch["ce_source"], minlength=2).tolist()
        assert counts == [sum(w for w, s in zip(want, sources) if s == i) for i in (0, 1)]


def test_one_source_has_no_ce_source(corpus):
    loader = build_loader(sources=[Source(shards=corpus["A"][0])], batch_pairs=4, layout=LAYOUT, seed=5)
    assert "ce_source" not in next(iter(loader.iter_epoch()))


@pytest.mark.parametrize("objective", ["llm_jepa", "stp"])
def test_per_source_ce_is_each_records_own_ce(corpus, objective):
    """The objective's per-source CE of a mixed batch against the oracle: a Hugging Face model's
    own forward on each record alone, its CE at the positions the record labels (a pair from the
    assistant header on, a text every next token), summed by source. The sums add up to the
    batch's CE."""
    lm = tiny_llama(64)
    layout = LAYOUT if objective == "llm_jepa" else make_layout(k=0, objective="stp")
    model = JepaModel(lm, layout.jepa)
    loader = mixture_loader(corpus, {"A": {}, "B": {}}, collate=None, batch_pairs=8, layout=layout)
    for batch in islice(loader.iter_epoch(), 2):
        with torch.no_grad():
            out = model(batch)
        assert out.z_a.shape[0] > 0  # the pairs' latent term (views or spans) ran beside the CE
        want = torch.zeros(2, 2, dtype=torch.float64)
        for record, source in zip(batch_records(corpus, batch), batch["source_index"].tolist()):
            full = torch.as_tensor(record["full"], dtype=torch.long)
            with torch.no_grad():
                logits = lm(input_ids=full[None]).logits[0].double()
            first = record["prompt_len"] - 1 if source == 0 else 0
            losses = torch.nn.functional.cross_entropy(logits[first:-1], full[first + 1:], reduction="none")
            want[:, source] += torch.tensor([losses.sum().item(), losses.numel()], dtype=torch.float64)
        torch.testing.assert_close(out.source_ce.double(), want, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(out.ce.double(), want[0].sum() / want[1].sum(), rtol=1e-5, atol=1e-6)


def test_per_source_ce_matches_a_loop():
    gen = torch.Generator().manual_seed(0)
    token_ce = torch.rand(30, generator=gen)
    ce_source = torch.randint(0, 4, (30,), generator=gen)
    got = per_source_ce(token_ce, ce_source, 5)
    want = [[0.0] * 5, [0.0] * 5]
    for value, source in zip(token_ce.tolist(), ce_source.tolist()):
        want[0][source] += value
        want[1][source] += 1
    torch.testing.assert_close(got, torch.tensor(want))


# --- token budget ------------------------------------------------------------------------------

BUDGET = 150


def check_budget_epoch(corpus, loader, batches):
    """Each micro-batch fits the budget, and all but a window's last would overflow with one more."""
    window = loader.dataset.batch_size
    sequence = [s for b in batches for s in b["sources"]]
    position = 0
    for batch in batches:
        costs = [cost(record_of(corpus, s), K) for s in batch["sources"]]
        assert sum(costs) <= BUDGET
        position += len(costs)
        if position % window:  # not the window's last micro-batch: the next record did not fit
            assert sum(costs) + cost(record_of(corpus, sequence[position]), K) > BUDGET
    return sequence


def test_token_budget_cuts_and_covers_the_epoch(corpus):
    loader = mixture_loader(corpus, {"A": {}, "B": {}}, tokens_per_batch=BUDGET)
    batches = list(loader.iter_epoch())
    sequence = check_budget_epoch(corpus, loader, batches)
    window = loader.dataset.batch_size
    assert 1 < window < 70 and len(sequence) == 70 // window * window  # the incomplete window is left out
    assert len(set(sequence)) == len(sequence)
    with pytest.raises(ValueError, match="token budget"):
        loader.batches_per_epoch
    lengths = np.load(os.path.join(corpus["B"][0], RECORD_LENGTHS_FILE))
    assert lengths.tolist() == [[len(r["full"]), 0, 0] for r in corpus["B"][1]]


@pytest.mark.parametrize("mixing", ["random", "per_stream"])
def test_token_budget_resume_inside_a_window(corpus, mixing):
    def loader():
        # per_stream needs a whole window of every rank from each source: B is repeated to have one
        return mixture_loader(corpus, {"A": {"repeat": 3}, "B": {"repeat": 5}}, tokens_per_batch=BUDGET, mixing=mixing)

    reference = loader()
    total = 80  # into the second epoch
    expected = [b["sources"] for b in islice(reference, total)]
    if mixing == "per_stream":  # every window (all its micro-batches) comes from one source
        window, taken = reference.dataset.batch_size, [s.split(":")[0] for b in expected for s in b]
        assert all(len(set(taken[i : i + window])) == 1 for i in range(0, len(taken) - window, window))
    for stop in (3, 30, 70):
        interrupted = loader()
        for _ in islice(interrupted, stop):
            pass
        state = json.loads(json.dumps(interrupted.state_dict()))
        resumed = loader()
        resumed.load_state_dict(state)
        assert [b["sources"] for b in islice(resumed, total - stop)] == expected[stop:], stop
        if stop == 3:
            assert state["micro_batches_in_window"] == 3  # windows hold about 16 micro-batches
    assert reference.epoch >= 1


def test_token_budget_workers_deliver_the_same_batches(corpus):
    runs = []
    for workers in (0, 2):
        loader = mixture_loader(corpus, {"A": {}, "B": {}}, tokens_per_batch=BUDGET, num_workers=workers)
        runs.append([b["sources"] for b in loader.iter_epoch()])
    assert runs[0] == runs[1]


def test_token_budget_refuses_a_record_over_it(corpus):
    with pytest.raises(ValueError, match=r"A/shard\.\d{5}\.mds.*exceeds data\.tokens_per_batch=20"):
        mixture_loader(corpus, {"A": {}}, tokens_per_batch=20)


def test_record_lengths_must_match_the_index(tmp_path):
    directory = write_records(str(tmp_path / "C"), random_records(10, kind="pair", seed=3, name="C"), tiny_tokenizer())
    np.save(os.path.join(directory, RECORD_LENGTHS_FILE), np.zeros((9, 3), np.int32))
    with pytest.raises(ValueError, match=r"record_lengths\.npy: shape \(9, 3\), but the index has 10 records"):
        build_loader(sources=[Source(shards=directory)], batch_pairs=2, layout=LAYOUT, tokens_per_batch=BUDGET)


def test_record_costs_follow_the_layout():
    lengths = [[30, 10, 12], [25, 0, 0], [600, 300, 200]]  # a pair, a text, a long pair
    assert record_costs(lengths, 2).tolist() == [30 + 12 + 12, 25, 600 + 302 + 200]
    assert record_costs(lengths, 2, max_length=256).tolist() == [54, 25, 256 + 256 + 200]
    assert record_costs(lengths, 0, views=False).tolist() == [30, 25, 600]  # lambda 0: CE only


def test_plan_takes_the_fullest_rank():
    costs = np.array([[[5, 5, 5, 5], [9, 2, 1, 1]]])  # one window, two ranks
    assert plan_windows(costs, 10) == [[1, 3, 4]]  # rank 1 stops the first cut, rank 0 the second
    assert plan_windows(np.array([[[5, -1], [5, 5]]]), 10) == [None]


# --- two ranks, each its own process -----------------------------------------------------------


def run_ranks(tmp_path, name, args, world=2, timeout=180):
    """Run the worker as `world` ranks of one node; return each rank's JSON result."""
    out = tmp_path / name
    run_worker(WORKER.name, out, world, *args, timeout=timeout)
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(world)]


def test_two_ranks_same_cuts_budget_and_resume(tmp_path):
    tokenizer = tiny_tokenizer()
    dirs = []
    for name, kind, count, seed in (("A", "pair", 50, 4), ("B", "text", 37, 5)):
        dirs.append(write_records(str(tmp_path / name), random_records(count, kind=kind, seed=seed, name=name), tokenizer))
    head = 5
    args = ["--sources", *dirs, "--budget", str(BUDGET), "--head", str(head)]
    first = run_ranks(tmp_path, "first", args)
    assert first[0]["state"] == first[1]["state"] and "micro_batches_in_window" in first[0]["state"]
    state_file = tmp_path / "state.json"
    state_file.write_text(json.dumps(first[0]["state"]))
    rerun = run_ranks(tmp_path, "rerun", args + ["--resume-from", str(state_file)])

    records = {}
    for directory in dirs:
        name = os.path.basename(directory)
        for record in random_records(50 if name == "A" else 37, kind="pair" if name == "A" else "text",
                                     seed=4 if name == "A" else 5, name=name):
            records[record["source"]] = record
    epochs = [result["epoch"] for result in first]
    assert len(epochs[0]) == len(epochs[1]) > 2  # the same number of micro-batches on both ranks
    window = first[0]["window"]
    for step, (mine, theirs) in enumerate(zip(*epochs)):
        assert len(mine) == len(theirs)  # and the same records per micro-batch
        for batch in (mine, theirs):
            assert sum(cost(records[s], K) for s in batch) <= BUDGET
    for rank in range(2):
        taken = [s for batch in epochs[rank] for s in batch]
        assert len(taken) % window == 0
        assert first[rank]["head"] == epochs[rank][:head]
        assert rerun[rank]["resumed"] == epochs[rank][head:]
    both = [s for e in epochs for batch in e for s in batch]
    # 87 records: the window is a rank's whole epoch share, padded by streaming with one repeat
    assert set(both) == set(records) and len(both) == 2 * window == 2 * 44


# --- configuration -----------------------------------------------------------------------------


def test_config_sources_and_budget(tmp_path):
    from megajepa.config import ConfigError, load_config
    from megajepa.data.mixture import sources_from_config

    path = tmp_path / "mix.yaml"
    path.write_text(
        f"data:\n  tokenizer: {tmp_path}\n  tokens_per_batch: 4096\n  mixing: per_stream\n  sources:\n"
        "    - {shards: a, proportion: 0.7}\n    - {shards: b, remote: 's3://bucket/b', proportion: 0.3, name: web}\n"
    )
    cfg = load_config(str(path))
    assert [(s.shards, s.remote, s.proportion, s.label) for s in sources_from_config(cfg.data)] == [
        ("a", None, 0.7, "a"), ("b", "s3://bucket/b", 0.3, "web"),
    ]
    assert cfg.data.tokens_per_batch == 4096 and cfg.data.mixing == "per_stream"
    one = load_config(None, ["data.shards=s", f"data.tokenizer={tmp_path}"])
    assert [(s.shards, s.remote) for s in sources_from_config(one.data)] == [("s", None)]
    unweighted = tmp_path / "unweighted.yaml"
    unweighted.write_text(path.read_text().replace(", proportion: 0.3", ""))
    with pytest.raises(ConfigError, match=f"{unweighted}: data.sources\\[1\\]: when one source has a proportion"):
        load_config(str(unweighted))
    with pytest.raises(ConfigError, match="command line: .*set a list whole"):
        load_config(str(path), ["data.sources.1.proportion=null"])
    with pytest.raises(ConfigError, match="data.shards: set data.shards .* not both or neither"):
        load_config(str(path), ["data.shards=s"])
    # the conversation and both views of one record, each up to data.max_length (default 512)
    with pytest.raises(ConfigError, match=rf"command line: data.tokens_per_batch: 100 cannot hold one record of up to {3 * 512} tokens"):
        load_config(str(path), ["data.tokens_per_batch=100"])
    with pytest.raises(ConfigError, match="data.mixing: 'sample' is not one of"):
        load_config(str(path), ["data.mixing=sample"])


def test_source_step_values_and_mean_ce():
    from megajepa.data.mixture import source_step_values, with_source_ce

    counts = torch.tensor([[3, 1], [3, 0], [40, 12]])  # records, pairs, tokens of "chat" and "web"
    values = source_step_values(["chat", "web"], counts, torch.tensor([[6.0, 2.5], [4.0, 0.0]]))
    assert {k: float(v) for k, v in values.items()} == {
        "source/chat/records": 3, "source/chat/pairs": 3, "source/chat/tokens": 40, "source/chat/ce_sum": 6.0,
        "source/chat/ce_tokens": 4.0, "source/web/records": 1, "source/web/pairs": 0, "source/web/tokens": 12,
        "source/web/ce_sum": 2.5, "source/web/ce_tokens": 0.0,
    }
    row = with_source_ce({k: float(v) for k, v in values.items()})
    assert row["source/chat/ce"] == 1.5 and row["source/web/ce"] != row["source/web/ce"]  # nan: no tokens
