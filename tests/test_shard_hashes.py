"""Corrupted shards are found by their index's digest, named in one line; old shards still load.

The oracle is the index.json streaming's MDSWriter writes (its `hashes`) and the bytes as
prepared: a shard changed after preparing is refused, by the file's name; an unchanged one reads
back the records streaming's own reader gives.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from streaming import StreamingDataset

from megajepa.data.loader import PairDataset, build_loader
from megajepa.data.mixture import Source
from megajepa.data.prepare import prepare
from megajepa.data.prepare_text import prepare_text
from megajepa.data.shard_hashes import SHARD_HASHES, CorruptShard

FIXTURE = Path(__file__).parent / "fixtures" / "streaming-0.13"  # written before shards had digests


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "shards"
    prepare([str(FIXTURE / "records.jsonl")], str(out), str(FIXTURE / "tokenizer"), progress=False)
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _flip(path: Path, offset_fraction: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * offset_fraction)] ^= 0x01
    path.write_bytes(bytes(data))


def _dataset(shards: Path) -> PairDataset:
    return PairDataset(sources=[Source(shards=str(shards))], batch_size=1, shuffle=False)


def test_prepare_and_prepare_text_record_digests(prepared, tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("one document here\nand a second one\n")
    prepare_text([str(text)], str(tmp_path / "text"), str(FIXTURE / "tokenizer"), progress=False)
    for shards in (prepared, tmp_path / "text"):
        for shard in json.loads((shards / "index.json").read_text())["shards"]:
            assert sorted(shard["zip_data"]["hashes"]) == sorted(shard["raw_data"]["hashes"]) == SHARD_HASHES


def test_intact_shards_read_as_streaming_reads_them(prepared, tmp_path):
    shards = _copy(prepared, tmp_path / "shards")
    ours = [_dataset(shards).raw_item(i)["full"] for i in range(48)]
    theirs = StreamingDataset(local=str(shards), batch_size=1, shuffle=False)
    assert all(np.array_equal(a, theirs[i]["full"]) for i, a in enumerate(ours))


def test_a_flipped_byte_in_a_decompressed_shard_is_named(prepared, tmp_path):
    shards = _copy(prepared, tmp_path / "shards")
    _dataset(shards)[0]  # streaming decompresses the shard beside its .zstd
    raw = shards / "shard.00000.mds"
    _flip(raw)
    with pytest.raises(CorruptShard) as caught:
        _dataset(shards)[5]
    message = str(caught.value)
    assert "\n" not in message and f"{raw}: corrupt shard of the dataset {shards}" in message


def test_a_damaged_zstd_shard_is_named_before_it_is_decompressed(prepared, tmp_path):
    shards = _copy(prepared, tmp_path / "shards")
    zstd = shards / "shard.00000.mds.zstd"
    _flip(zstd)
    dataset = _dataset(shards)
    with pytest.raises(CorruptShard) as caught:
        next(iter(dataset))  # through streaming's prefetching threads
    assert "\n" not in str(caught.value) and str(caught.value).startswith(f"{zstd}: corrupt shard of the dataset {shards}")
    assert not (shards / "shard.00000.mds").exists()  # never decoded into wrong tokens


def test_a_corrupt_shard_found_in_a_loader_worker_keeps_its_one_line(prepared, tmp_path):
    shards = _copy(prepared, tmp_path / "shards")
    zstd = shards / "shard.00000.mds.zstd"
    _flip(zstd, 0.9)
    loader = build_loader(str(shards), batch_pairs=4, layout=None, num_workers=1, shuffle=False, collate=lambda s: {})
    with pytest.raises(CorruptShard) as caught:
        next(iter(loader))
    assert caught.value.one_line().startswith(f"{zstd}: corrupt shard of the dataset {shards}")
    assert "\n" not in caught.value.one_line()


def test_shards_prepared_without_digests_still_load(tmp_path):
    shards = _copy(FIXTURE / "shards", tmp_path / "old")
    assert all(not s["zip_data"]["hashes"] for s in json.loads((shards / "index.json").read_text())["shards"])
    theirs = StreamingDataset(local=str(shards), batch_size=1, shuffle=False)
    ours = _dataset(shards)
    assert all(np.array_equal(ours.raw_item(i)["full"], theirs[i]["full"]) for i in range(48))


@pytest.mark.parametrize("decompressed", [False, True])
def test_eval_pairs_from_a_corrupt_shard_name_it(prepared, tmp_path, decompressed):
    from transformers import AutoTokenizer

    from megajepa.eval.data import load_eval_pairs

    shards = _copy(prepared, tmp_path / "shards")
    tokenizer = AutoTokenizer.from_pretrained(str(FIXTURE / "tokenizer"))
    intact = load_eval_pairs(str(shards), tokenizer, limit=4)  # decompresses the first shard
    theirs = StreamingDataset(local=str(shards), batch_size=1, shuffle=False)
    assert [p.record["full"].tolist() for p in intact] == [theirs[i]["full"].tolist() for i in range(4)]
    damaged = shards / "shard.00000.mds"
    if not decompressed:
        damaged.unlink()
        damaged = shards / "shard.00000.mds.zstd"
    _flip(damaged)
    with pytest.raises(CorruptShard) as caught:
        load_eval_pairs(str(shards), tokenizer, limit=4)
    assert "\n" not in str(caught.value) and str(caught.value).startswith(f"{damaged}: corrupt shard of the dataset {shards}")
