import errno
import json
import os
import threading
import time

import numpy as np
import pytest
import streaming
from streaming import StreamingDataset
from transformers import AutoTokenizer

from megajepa.data import embedded
from megajepa.data.embedded import ensure_embedded, ensure_tokenizer
from megajepa.data.fingerprint import FINGERPRINT_FILE, check_fingerprint, file_sha256, tokenizer_hash
from megajepa.data.prepare import BadInput, BadRecord, RecordEncoder, main, parse_json_line, prepare, split_text
from megajepa.data.synthetic import generate
from megajepa.data.tokenizer import train_tokenizer

TEXT = "The first sentence is here. A second one follows! Is this the third? Yes, the fourth ends it."


@pytest.fixture(scope="module")
def chat_jsonl(tmp_path_factory):
    return generate(str(tmp_path_factory.mktemp("jsonl")), seed=2, n_train=60, n_eval=10)["train"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, chat_jsonl):
    with open(chat_jsonl) as f:
        texts = [m["content"] for line in f for m in json.loads(line)["messages"]]
    out = str(tmp_path_factory.mktemp("tokenizer"))
    train_tokenizer(texts + [TEXT], out, vocab_size=400)
    return out


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def write_lines(path, lines):
    with open(path, "w") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return str(path)


def read_back(shard_dir):
    dataset = StreamingDataset(local=shard_dir, batch_size=1, shuffle=False)
    return [dataset[i] for i in range(len(dataset))]


def run(inputs, out, tokenizer_dir, **kwargs):
    return prepare(inputs, str(out), tokenizer_dir, progress=False, **kwargs)


def encode(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def render(tokenizer, messages):
    return tokenizer(tokenizer.apply_chat_template(messages, tokenize=False))["input_ids"]


def with_pred(tokenizer, message, front=False):
    """The reference's view with one predictor token added to its content."""
    pred = "<|pred_0|>"
    content = pred + message["content"] if front else message["content"] + pred
    return render(tokenizer, [{**message, "content": content}])


def check_view(tokenizer, sample, name, message):
    """`name` is `message` rendered alone, and its insertion points put [PRED] where the reference does."""
    tokens, (front, end) = sample[name].tolist(), sample[name + "_insert"].tolist()
    pred = tokenizer.convert_tokens_to_ids("<|pred_0|>")
    assert tokens == render(tokenizer, [message])
    assert tokens[:end] + [pred] + tokens[end:] == with_pred(tokenizer, message)
    if front >= 0:  # -1: a token there would change the tokens before it
        assert tokens[:front] + [pred] + tokens[front:] == with_pred(tokenizer, message, front=True)
    return front


def test_chat_jsonl_round_trip_and_fingerprint(tmp_path, chat_jsonl, tokenizer_dir, tokenizer):
    summary = run([chat_jsonl], tmp_path / "out", tokenizer_dir)
    samples = read_back(str(tmp_path / "out"))
    with open(chat_jsonl) as f:
        records = [json.loads(line) for line in f]
    assert len(samples) == len(records) == summary["counts"]["written"] == summary["counts"]["read"]
    for i, (sample, record) in enumerate(zip(samples, records)):
        messages = record["messages"]
        assert sample["sample_id"] == i
        assert sample["source"] == f"{chat_jsonl}:{i + 1}"
        assert sample["full"].dtype == np.int32
        full = render(tokenizer, messages)
        assert sample["full"].tolist() == full
        prompt = tokenizer(tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True))
        assert sample["prompt_len"] == len(prompt["input_ids"])
        assert check_view(tokenizer, sample, "user", messages[-2]) >= 0  # front_pred works with this template
        assert check_view(tokenizer, sample, "assistant", messages[-1]) >= 0
        user_start, user_end, reply_start, reply_end = sample["full_spans"].tolist()
        assert tokenizer.decode(full[user_start:user_end]) == messages[-2]["content"]
        assert tokenizer.decode(full[reply_start:reply_end]) == messages[-1]["content"]

    with open(tmp_path / "out" / FINGERPRINT_FILE) as f:
        fingerprint = json.load(f)
    assert check_fingerprint(str(tmp_path / "out"), tokenizer)["tokenizer_hash"] == tokenizer_hash(tokenizer)
    assert fingerprint["format_version"] == 2
    assert fingerprint["vocab_size"] == len(tokenizer)
    assert fingerprint["chat_template"] == tokenizer.chat_template
    assert fingerprint["sources"] == {chat_jsonl: file_sha256(chat_jsonl)}
    assert fingerprint["max_length"] == 512
    assert fingerprint["counts"] == {"read": len(records), "written": len(records), "truncated": 0, "skipped": {}}
    lengths = [len(s["full"]) for s in samples]
    assert fingerprint["token_lengths"]["full"]["max"] == max(lengths)
    assert fingerprint["token_lengths"]["full"]["p50"] == sorted(lengths)[(len(lengths) + 1) // 2 - 1]
    assert fingerprint["token_lengths"]["assistant"]["max"] == max(len(s["assistant"]) for s in samples)


def test_pair_and_text_records(tmp_path, tokenizer_dir, tokenizer):
    path = write_lines(
        tmp_path / "mixed.jsonl",
        [
            {"view_a": "lines with a digit", "view_b": ".*[0-9].*", "extra": 1},
            {"text": TEXT},
        ],
    )
    samples = read_back(run([path], tmp_path / "out", tokenizer_dir)["out"])
    user = {"role": "user", "content": "lines with a digit"}
    assistant = {"role": "assistant", "content": ".*[0-9].*"}
    assert samples[0]["full"].tolist() == render(tokenizer, [user, assistant])
    check_view(tokenizer, samples[0], "user", user)
    check_view(tokenizer, samples[0], "assistant", assistant)
    # plain text: no template; CE over the text and eos, views its prefix and continuation
    prefix, continuation = split_text(TEXT, 0.5)
    assert samples[1]["full"].tolist() == encode(tokenizer, TEXT) + [tokenizer.eos_token_id]
    assert samples[1]["user"].tolist() == encode(tokenizer, prefix)
    assert samples[1]["user_insert"].tolist() == [0, len(samples[1]["user"])]
    assert samples[1]["assistant"].tolist() == encode(tokenizer, continuation)
    assert samples[1]["prompt_len"] == 0


def test_field_overrides_detection_hellaswag_style(tmp_path, tokenizer_dir, tokenizer):
    """hellaswag's records hold `messages` and views of their own (`text`, `code`: message lists)."""
    messages = [{"role": "user", "content": "ctx"}, {"role": "assistant", "content": "ending"}]
    text = [{"role": "user", "content": "the context, alone"}]
    code = [{"role": "assistant", "content": "the ending, alone"}]
    path = write_lines(tmp_path / "hs.jsonl", [{"messages": messages, "text": text, "code": code}])
    samples = read_back(
        run([path], tmp_path / "out", tokenizer_dir, field_map={"view_a": "text", "view_b": "code"})["out"]
    )
    assert samples[0]["full"].tolist() == render(tokenizer, messages)
    check_view(tokenizer, samples[0], "user", text[0])
    check_view(tokenizer, samples[0], "assistant", code[0])



def test_hellaswag_views_are_detected_without_field(tmp_path, tokenizer_dir, tokenizer, capsys):
    """Generated hellaswag-like records (the reference's layout: `messages` ending in a letter, the
    views under `text` and `code`) give without --field what --field view_a=text view_b=code gives."""
    records = []
    for i in range(6):
        context, ending = f"A man walks to the car number {i}.", f"He opens door {i} and sits down."
        records.append({
            "messages": [{"role": "system", "content": "Pick the ending."},
                         {"role": "user", "content": f"{context} A: x B: {ending} C: y D: z"},
                         {"role": "assistant", "content": "ABCD"[i % 4]}],
            "text": [{"role": "user", "content": context}],
            "code": [{"role": "assistant", "content": ending}],
        })  # fmt: skip
    path = write_lines(tmp_path / "hellaswag_train.jsonl", records)
    named = run([path], tmp_path / "named", tokenizer_dir, field_map={"view_a": "text", "view_b": "code"})
    assert "views of their own" not in capsys.readouterr().err  # --field chose them
    detected = run([path], tmp_path / "detected", tokenizer_dir)
    assert "6 record(s) hold views of their own" in capsys.readouterr().err
    for a, b in zip(read_back(named["out"]), read_back(detected["out"]), strict=True):
        assert all(np.array_equal(a[key], b[key]) for key in a), a["sample_id"]
    check_view(tokenizer, read_back(detected["out"])[0], "assistant", records[0]["code"][0])  # not the letter

def test_plain_format_is_the_references_plain_train_all(tmp_path, tokenizer_dir, tokenizer):
    record = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "one way to say it"},
                           {"role": "assistant", "content": "another way to say it"}]}
    path = write_lines(tmp_path / "plain.jsonl", [record])
    sample = read_back(run([path], tmp_path / "out", tokenizer_dir, input_format="plain")["out"])[0]
    assert sample["full"].tolist() == encode(tokenizer, "one way to say it") + [tokenizer.eos_token_id]
    assert sample["user"].tolist() == encode(tokenizer, "one way to say it")
    assert sample["assistant"].tolist() == encode(tokenizer, "another way to say it")


def test_overlength_truncate_keeps_the_record_and_skip_drops_it(tmp_path, tokenizer_dir, tokenizer):
    long = {"view_a": "word " * 40 + "end", "view_b": "b"}
    path = write_lines(tmp_path / "in.jsonl", [long, {"view_a": "a", "view_b": "b"}])
    cut = run([path], tmp_path / "cut", tokenizer_dir, max_length=16)
    sample = read_back(cut["out"])[0]
    full = render(tokenizer, [{"role": "user", "content": long["view_a"]}, {"role": "assistant", "content": "b"}])
    assert sample["full"].tolist() == full[:16] and len(sample["user"]) == 16
    assert cut["counts"]["truncated"] == 1 and cut["counts"]["written"] == 2
    skipped = run([path], tmp_path / "skip", tokenizer_dir, max_length=16, overlength="skip")
    assert skipped["counts"]["written"] == 1 and skipped["counts"]["skipped"] == {"too_long": 1}


@pytest.mark.parametrize("record", [
    {"text": TEXT * 400},
    {"messages": [{"role": "user", "content": "word " * 3000 + "end"}, {"role": "assistant", "content": "the answer"}]},
    {"view_a": "short question", "view_b": "answer, " * 3000},
], ids=["text", "chat", "pair"])
def test_an_overlong_content_is_cut_before_tokenizing_keeping_every_token_kept(tokenizer, record):
    """The oracle: the same encoder tokenizing whole contents (no cut), then cutting at max_length."""
    bounded, whole = RecordEncoder(tokenizer, 16), RecordEncoder(tokenizer, 16)
    whole.char_limit = 0
    assert bounded.char_limit < max(len(str(v)) for v in record.values()) // 4  # the cut takes effect
    (ours, ours_cut), (theirs, theirs_cut) = bounded(record), whole(record)
    assert ours_cut and theirs_cut
    for name in ("full", "user", "assistant", "full_spans", "user_insert", "assistant_insert"):
        a, b = ours[name].tolist(), theirs[name].tolist()
        if name.endswith("_insert") or name == "full_spans":  # a content's end: past the 16 tokens kept in both
            a, b = [x if x < 16 else "past" for x in a], [x if x < 16 else "past" for x in b]
        assert a == b, name
    assert min(ours["prompt_len"], 16) == min(theirs["prompt_len"], 16)  # where the reply starts, likewise
    with pytest.raises(BadRecord, match="longer than --max-length=16"):
        RecordEncoder(tokenizer, 16, overlength="skip")(record)


def test_a_multi_megabyte_line_is_prepared_in_seconds(tmp_path, tokenizer_dir):
    huge = {"text": TEXT * 60_000}  # 5.6 MB on one line: minutes when every character was tokenized
    path = write_lines(tmp_path / "in.jsonl", [huge, {"view_a": "a", "view_b": "b"}])
    started = time.perf_counter()
    summary = run([path], tmp_path / "out", tokenizer_dir, max_length=64)
    assert time.perf_counter() - started < 30
    assert summary["counts"]["written"] == 2 and summary["counts"]["truncated"] == 1


def test_a_template_that_rewrites_the_content_at_the_pred_position_is_a_bad_record(tmp_path, tokenizer_dir, capsys):
    trimming = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] | trim + eos_token }}{% endfor %}"
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = trimming
    out = tmp_path / "tok"
    tok.save_pretrained(out)
    path = write_lines(tmp_path / "in.jsonl", [{"view_a": "trailing space ", "view_b": "b"}, {"view_a": "a", "view_b": "b"}])
    summary = run([path], tmp_path / "out", str(out))
    assert summary["counts"]["skipped"] == {"template_rewrites_content": 1}
    assert f"{path}:1: the chat template changes the content's tokens" in capsys.readouterr().err


def test_split_text_at_the_boundary_nearest_the_fraction():
    first_two = "The first sentence is here. A second one follows!"
    assert split_text(TEXT, 0.5) == (first_two, " Is this the third? Yes, the fourth ends it.")
    assert split_text(TEXT, 0.1) == ("The first sentence is here.", TEXT[len("The first sentence is here."):])
    assert split_text("one paragraph\n\nanother paragraph", 0.5) == ("one paragraph", "\n\nanother paragraph")
    assert split_text("no sentence end at all", 0.5) == ("no sentence", " end at all")
    assert split_text("Trailing end.  ", 0.9) == ("Trailing", " end.  ")
    with pytest.raises(BadRecord, match="no sentence or word boundary"):
        split_text("  single  ", 0.5)


def test_hf_dataset_directories_with_field_map(tmp_path, tokenizer_dir, tokenizer, monkeypatch):
    datasets = pytest.importorskip("datasets")  # an extra (megajepa[datasets]); the GPU image lacks it
    saved = str(tmp_path / "saved")
    datasets.Dataset.from_dict({"question": ["q one", "q two"], "answer": ["a one", "a two"]}).save_to_disk(saved)
    field_map = {"view_a": "question", "view_b": "answer"}
    samples = read_back(run([saved], tmp_path / "out", tokenizer_dir, field_map=field_map)["out"])
    assert [s["source"] for s in samples] == [f"{saved}:0", f"{saved}:1"]
    assert samples[1]["user"].tolist() == render(tokenizer, [{"role": "user", "content": "q two"}])
    assert samples[1]["assistant"].tolist() == render(tokenizer, [{"role": "assistant", "content": "a two"}])

    # A directory of data files goes through load_dataset (its cache kept out of $HOME).
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    files = tmp_path / "files"
    files.mkdir()
    write_lines(files / "part.jsonl", [{"body": "one doc. It has two sentences."}])
    samples = read_back(run([str(files)], tmp_path / "out2", tokenizer_dir, field_map={"text": "body"})["out"])
    assert samples[0]["user"].tolist() == encode(tokenizer, "one doc.")


NO_ROLE = {"messages": [{"content": "x"}, {"role": "assistant", "content": "y"}]}
NO_ANSWER = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}
BAD_LINES = [  # (line, reason counted, message)
    ("not json", "not_json", "not valid JSON"),
    (NO_ROLE, "missing_field", "messages[0]: missing 'role'"),
    ({"view_a": "only one view"}, "missing_field", "missing field 'view_b'"),
    ({"view_a": "a", "view_b": "   "}, "empty_view", "empty view: 'view_b' is empty"),
    (NO_ANSWER, "empty_view", "messages[1]: the assistant content is empty"),
    ({"view_a": "a", "view_b": "b", "messages": None}, "missing_field", "missing field 'messages'"),
    ({"messages": [{"role": "user", "content": "q"}]}, "invalid", "must be the assistant's"),
    ({"unrelated": 1}, "missing_field", "no 'messages', 'view_a'/'view_b' or 'text' field"),
    ({"view_a": "a \ud800 b", "view_b": "b"}, "not_utf8", "a lone surrogate '\\ud800' is not text"),  # JSON's escape
]


def test_surrogate_pairs_are_text_and_a_lone_one_is_not():
    assert parse_json_line(json.dumps({"t": "\U0001F600 \\ud800"}).encode()) == {"t": "\U0001F600 \\ud800"}
    with pytest.raises(BadRecord, match="lone surrogate"):
        parse_json_line(b'{"t": "\\udfff"}')


def test_bad_records_are_reported_and_skipped(tmp_path, tokenizer_dir, capsys):
    good = {"view_a": "good", "view_b": "pair"}
    lines = [good] + [line for line, _, _ in BAD_LINES] + ["   ", good]  # a blank line is no record
    path = write_lines(tmp_path / "bad.jsonl", lines)
    summary = run([path], tmp_path / "out", tokenizer_dir)
    stderr = capsys.readouterr().err
    for number, (_, _, message) in enumerate(BAD_LINES, start=2):
        assert f"{path}:{number}: " in stderr and message in stderr
    reasons = {}
    for _, reason, _ in BAD_LINES:
        reasons[reason] = reasons.get(reason, 0) + 1
    assert summary["counts"] == {
        "read": len(BAD_LINES) + 2, "written": 2, "truncated": 0, "skipped": dict(sorted(reasons.items()))
    }
    assert [s["source"] for s in read_back(summary["out"])] == [f"{path}:1", f"{path}:{len(lines)}"]


def test_reports_are_capped(tmp_path, tokenizer_dir, capsys):
    path = write_lines(tmp_path / "bad.jsonl", ["{"] * 25 + [{"view_a": "a", "view_b": "b"}])
    run([path], tmp_path / "out", tokenizer_dir)
    reported = capsys.readouterr().err.strip().splitlines()
    assert len(reported) == 21
    assert reported[-1] == "... and 5 more skipped records"


def leftovers(parent, name):
    return sorted(p for p in os.listdir(parent) if p.startswith(name))


def test_strict_stops_at_the_first_bad_record_leaving_nothing(tmp_path, tokenizer_dir, capsys):
    path = write_lines(tmp_path / "in.jsonl", [{"view_a": "a", "view_b": "b"}, "oops", "{"])
    code = main([path, "--out", str(tmp_path / "out"), "--tokenizer", tokenizer_dir, "--strict", "--no-progress"])
    assert code == 2
    assert capsys.readouterr().err.strip().startswith(f"{path}:2: not valid JSON")
    assert leftovers(tmp_path, "out") == []


def test_no_usable_record_is_an_error(tmp_path, tokenizer_dir):
    path = write_lines(tmp_path / "in.jsonl", ["nope"])
    with pytest.raises(BadInput, match="no usable records"):
        run([path], tmp_path / "out", tokenizer_dir)
    assert leftovers(tmp_path, "out") == []


def test_cli_errors(tmp_path, tokenizer_dir, capsys):
    assert main([str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "out"), "--tokenizer", tokenizer_dir]) == 2
    assert capsys.readouterr().err.startswith("megajepa prepare: error: no such input file or directory")
    with pytest.raises(SystemExit):
        main(["in.jsonl", "--out", "x", "--field", "prompt=question"])
    assert "expected NAME=COLUMN" in capsys.readouterr().err


def test_existing_output_needs_overwrite(tmp_path, tokenizer_dir):
    path = write_lines(tmp_path / "in.jsonl", [{"view_a": "a", "view_b": "b"}])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        run([path], out, tokenizer_dir)
    assert (out / "keep.txt").exists()
    run([path], out, tokenizer_dir, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "index.json").exists()
    assert leftovers(tmp_path, "out") == ["out"]


def test_reruns_are_byte_identical(tmp_path, chat_jsonl, tokenizer_dir):
    first = run([chat_jsonl], tmp_path / "one", tokenizer_dir, shard_size_limit=2000)["out"]
    second = run([chat_jsonl], tmp_path / "two", tokenizer_dir, shard_size_limit=2000)["out"]
    names = sorted(os.listdir(first))
    assert len([n for n in names if n.endswith(".mds.zstd")]) > 1  # the size limit took effect
    assert names == sorted(os.listdir(second))
    for name in names:
        with open(os.path.join(first, name), "rb") as a, open(os.path.join(second, name), "rb") as b:
            assert a.read() == b.read(), name


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_run_leaves_no_dataset(tmp_path, chat_jsonl, tokenizer_dir, monkeypatch, error):
    class FailingWriter(streaming.MDSWriter):
        writes = 0

        def write(self, sample):
            FailingWriter.writes += 1
            if FailingWriter.writes == 5:
                raise error("interrupted")
            super().write(sample)

    monkeypatch.setattr(streaming, "MDSWriter", FailingWriter)  # prepare imports it when it runs
    with pytest.raises(error):
        run([chat_jsonl], tmp_path / "out", tokenizer_dir, shard_size_limit=500)  # shards already flushed
    assert leftovers(tmp_path, "out") == []


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, chat_jsonl, tokenizer_dir, monkeypatch, capsys):
    import streaming

    class FullDisk(streaming.MDSWriter):
        def flush_shard(self):  # where the shard file is written
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(self.local, "shard.00000.mds.zstd"))

    monkeypatch.setattr(streaming, "MDSWriter", FullDisk)  # prepare imports it when it writes
    out = tmp_path / "out"
    code = main([chat_jsonl, "--out", str(out), "--tokenizer", tokenizer_dir, "--no-progress", "--shard-size", "500"])
    assert code == 2
    assert capsys.readouterr().err == f"megajepa prepare: error: no space left on device: {out}\n"
    assert leftovers(tmp_path, "out") == []


def test_embedded_data_is_built_once_and_reused(tmp_path, monkeypatch):
    root = str(tmp_path / "demo")
    calls = []
    monkeypatch.setattr(embedded, "generate", lambda *a, **k: calls.append(1) or generate(*a, **k))
    small = dict(n_train=120, n_eval=12, progress=False)
    builders = [threading.Thread(target=ensure_embedded, args=(root,), kwargs=small) for _ in range(2)]
    for thread in builders:
        thread.start()
    for thread in builders:
        thread.join()
    paths = ensure_embedded(root, **small)
    assert calls == [1]
    for key in ("train_jsonl", "eval_jsonl", "paraphrases_jsonl"):
        assert os.path.isfile(paths[key])
    tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
    assert len(read_back(paths["train_shards"])) == 120
    assert len(read_back(paths["eval_shards"])) == 12
    check_fingerprint(paths["eval_shards"], tokenizer)
    assert sorted(os.listdir(root)) == [".lock", "jsonl", "shards", "tokenizer"]


def test_builders_wait_for_the_lock_holder(tmp_path):
    root = str(tmp_path / "demo")
    holder = embedded._lock(root)
    holder.acquire()
    waiter = threading.Thread(target=ensure_tokenizer, args=(root,), kwargs=dict(n_train=50, n_eval=5))
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive() and not os.path.exists(os.path.join(root, "tokenizer"))
    holder.release()
    waiter.join()
    assert os.path.isdir(os.path.join(root, "tokenizer"))


def test_default_tokenizer_is_the_embedded_one(tmp_path, monkeypatch, capsys):
    """`megajepa prepare` without --tokenizer uses the embedded one (prepare() itself takes none),
    says so, and checks its input before building it."""
    from megajepa.cli import main as cli

    monkeypatch.chdir(tmp_path)
    path = write_lines(tmp_path / "in.jsonl", [{"view_a": "a", "view_b": "b"}])
    assert main([path, "--out", str(tmp_path / "refused")]) == 2  # no default outside the CLI
    assert cli(["prepare", "missing.jsonl", "--out", str(tmp_path / "out")]) == 2
    assert "no such input file or directory: missing.jsonl" in capsys.readouterr().err
    assert not os.path.exists("data")  # nothing built for a run that cannot start
    assert cli(["prepare", path, "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    assert f"using the demo tokenizer at {os.path.join('data', 'demo', 'tokenizer')}" in capsys.readouterr().err
    tokenizer = AutoTokenizer.from_pretrained(os.path.join("data", "demo", "tokenizer"))
    check_fingerprint(str(tmp_path / "out"), tokenizer)


def test_stale_staging_of_dead_processes_is_removed_before_a_run(tmp_path, chat_jsonl, tokenizer_dir, capsys):
    """What a SIGKILL-ed prepare leaves (staging named by host and pid) is removed by the next run;
    a live process's staging and another host's are kept."""
    import socket
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    alive = subprocess.Popen(["sleep", "60"])
    host = socket.gethostname()
    try:
        stale = [tmp_path / f"out.tmp-{host}-{dead.pid}", tmp_path / f"out.old-{host}-{dead.pid}"]
        kept = [tmp_path / f"out.tmp-{host}-{alive.pid}", tmp_path / f"out.tmp-elsewhere-{dead.pid}"]
        for path in stale + kept:
            path.mkdir()
            (path / "shard.00000.mds").write_bytes(b"partial")
        run([chat_jsonl], tmp_path / "out", tokenizer_dir)
        assert [p.exists() for p in stale] == [False, False]
        assert [p.exists() for p in kept] == [True, True]
        assert f"removed {stale[0]}" in capsys.readouterr().err
    finally:
        alive.kill()
        alive.wait()


def test_sigterm_removes_the_staging_directory(tmp_path, tokenizer_dir):
    import signal
    import subprocess
    import sys

    big = write_lines(tmp_path / "big.jsonl", [{"view_a": f"question {i} " * 20, "view_b": f"answer {i}"} for i in range(20000)])
    command = [sys.executable, "-m", "megajepa.cli", "prepare", big, "--out", str(tmp_path / "out"),
               "--tokenizer", tokenizer_dir, "--no-progress"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not leftovers(tmp_path, "out") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert leftovers(tmp_path, "out") == [] and not (tmp_path / "out").exists()


def test_rows_need_only_fit_the_longest_prepared_record(tmp_path, chat_jsonl, tokenizer_dir, tokenizer):
    """data.row_length is checked against the shards' longest sequences (fingerprint.json), not 3 x
    data.max_length: rows of exactly full + user + k + assistant of the longest pack every record,
    one token less is refused naming the key and the fingerprint."""
    from megajepa.config import ConfigError, load_config
    from megajepa.data.layout import Layout
    from megajepa.data.loader import build_loader
    from megajepa.data.tokenizer import add_pred_tokens, pred_token_ids

    out = tmp_path / "shards"
    longest = {name: stats["max"] for name, stats in run([chat_jsonl], out, tokenizer_dir)["token_lengths"].items()}
    needed = longest["full"] + longest["user"] + 1 + longest["assistant"]
    assert needed < 3 * 512
    add_pred_tokens(tokenizer, 1)
    for row_length in (needed, needed - 1):
        cfg = load_config("configs/demo.yaml", [f"data.shards={out}", f"data.tokenizer={tokenizer_dir}", "jepa.k=1",
                                                "data.max_length=512", f"data.row_length={row_length}"])
        layout = Layout(cfg.data, cfg.jepa, pred_token_ids(tokenizer, 1), tokenizer.pad_token_id)
        make = lambda: build_loader(str(out), batch_pairs=4, layout=layout, tokenizer=tokenizer, shuffle=False)  # noqa: E731
        if row_length == needed:
            assert sum(int(b["num_pairs"]) for b in make().iter_epoch()) == 60
        else:
            with pytest.raises(ConfigError, match=rf"{out}/fingerprint.json: data.row_length={needed - 1} cannot hold"):
                make()
