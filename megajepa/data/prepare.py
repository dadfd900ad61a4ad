"""`megajepa prepare`: JSONL files or local HF datasets -> tokenized records in MDS shards.

    megajepa prepare train.jsonl --out data/train [--tokenizer DIR] [--max-length 512] [--strict]

Each record becomes the sequences the published LLM-JEPA reference (galilai-group/llm-jepa,
finetune.py) runs, tokenized as it tokenizes them (`tokenizer(chat_template(messages))`):

    full              the whole conversation (the CE sequence); prompt_len: its tokens before the
                      assistant's reply; full_spans: [user content start, end, assistant content
                      start, end) in it (-1 where there is none)
    user              the user turn rendered alone (no system message), without [PRED] tokens;
                      user_insert: [start, end] of its content, where [PRED] tokens go
    assistant         the assistant message rendered alone, role header included; assistant_insert

The training layout (megajepa.data.layout) inserts the k [PRED] tokens at train time, so one
preparation serves every k. Input records, recognised per record (or fixed with --format):

    chat    {"messages": [{"role": ..., "content": ...}, ...]}   the last message the assistant's;
            the views are the last user turn and the assistant message
    pair    {"view_a": str, "view_b": str}   a conversation of a user and an assistant turn
    text    {"text": str}   plain text (no template): the CE sequence is the text and the eos token,
            the views its prefix and continuation, cut at the sentence or paragraph boundary
            nearest --text-split
    plain   chat records without the template, as the reference's --plain --train_all: the CE
            sequence is the user content and the eos token, the views the two contents

`--field NAME=COLUMN` takes NAME (messages, view_a, view_b, text) from COLUMN and wins over what a
record happens to hold. A chat record with message lists under `text` and `code` (the reference's
hellaswag, whose `messages` end in a letter A-D) takes its views from them without --field, and
the run says how many records did. A directory input is
a local Hugging Face dataset (saved with save_to_disk, or a directory of data files for
load_dataset). Sources are `FILE:LINE` (1-based) for JSONL and `DIR:ROW` (0-based) for datasets.

A sequence longer than --max-length is cut there and the record kept (--overlength truncate, the
reference's tokenizer call) or the record skipped (--overlength skip); both are counted. A content
too long to fit (more characters than --max-length times the longest vocabulary entry) is cut
there before it is tokenized, so a huge record costs what its kept tokens cost. Bad records (not
JSON, a lone surrogate, a missing or empty content, a template that rewrites the content where the
[PRED] tokens go) are reported as `SOURCE: reason` on stderr and skipped (--strict: stop at the
first, exit code 2). The output directory appears only when complete: shards are written into a
temporary sibling that is renamed at the end, and removed if anything fails. Re-running on the
same input gives byte-identical files.
"""

from __future__ import annotations

import argparse
import copy
import errno
import json
import os
import re
import signal
import sys
import time
from collections import Counter
from typing import Callable, Iterable, Iterator, Optional, Union

import numpy as np
from tqdm import tqdm

from megajepa.data.fingerprint import FORMAT_VERSION, file_sha256, tokenizer_hash, write_fingerprint
from megajepa.data.tokenizer import ROLES, chat_template, load_tokenizer
from megajepa.files import staged_directory

COLUMNS = {
    "sample_id": "int64",
    "full": "ndarray:int32",
    "prompt_len": "int32",
    "full_spans": "ndarray:int32",
    "user": "ndarray:int32",
    "user_insert": "ndarray:int32",
    "assistant": "ndarray:int32",
    "assistant_insert": "ndarray:int32",
    "source": "str",
}
FORMATS = ("auto", "chat", "pair", "text", "plain")
OVERLENGTH = ("truncate", "skip")
FIELDS = ("messages", "view_a", "view_b", "text")
MAX_REPORTED = 20  # bad records printed before only counting them

SENTENCE_OR_PARAGRAPH_END = re.compile(r"(?<=[.!?])(?=\s)|(?<=\S)(?=[ \t]*\n\s*\n)")
WORD_END = re.compile(r"(?<=\S)(?=\s)")


class BadRecord(ValueError):
    """One input record that cannot become a pair; `reason` is the key it is counted under."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


class BadInput(ValueError):
    """prepare cannot produce a dataset from its input (a bad record under --strict, or none usable)."""


SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # \ud800..\udfff: half of a UTF-16 pair, or alone


def parse_json_line(line: bytes):
    """json.loads, refusing a lone surrogate as BadRecord: JSON can escape one (\\ud800), but it is
    no character, and UTF-8 and the tokenizer refuse it (TypeError). Shared with prepare-text."""
    value = json.loads(line)
    if SURROGATE_ESCAPE.search(line):  # rare: only then re-encode the whole record
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as err:
            raise BadRecord("not_utf8", f"a lone surrogate {err.object[err.start]!r} is not text") from None
    return value


# ---------------------------------------------------------------------------------------------
# Reading inputs


class JsonlInput:
    def __init__(self, path: str):
        self.path = path

    def __len__(self) -> int:
        with open(self.path, "rb") as f:
            return sum(1 for line in f if line.strip())

    def __iter__(self) -> Iterator[tuple[str, Union[dict, BadRecord]]]:
        with open(self.path, "rb") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                source = f"{self.path}:{number}"
                try:
                    record = parse_json_line(line)
                except BadRecord as bad:
                    yield source, bad
                    continue
                except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
                    yield source, BadRecord("not_json", f"not valid JSON ({err})")
                    continue
                if not isinstance(record, dict):
                    yield source, BadRecord("invalid", f"expected a JSON object, got {type(record).__name__}")
                else:
                    yield source, record

    def files(self) -> list[str]:
        return [self.path]


class DatasetInput:
    """A local Hugging Face dataset directory; never touches the hub."""

    def __init__(self, path: str, split: str):
        try:
            import datasets
        except ImportError:
            raise ValueError(f"{path}: a Hugging Face dataset directory needs the datasets package: pip install 'megajepa[datasets]'") from None

        self.path = path
        saved = any(os.path.exists(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json"))
        loaded = datasets.load_from_disk(path) if saved else datasets.load_dataset(path)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{path}: no split {split!r} (has {', '.join(loaded)}); choose one with --split")
            loaded = loaded[split]
        self.dataset = loaded

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[tuple[str, Union[dict, BadRecord]]]:
        for row, record in enumerate(self.dataset):
            yield f"{self.path}:{row}", record

    def files(self) -> list[str]:
        found = []
        for folder, dirs, names in os.walk(self.path):
            dirs.sort()
            found += [os.path.join(folder, name) for name in sorted(names)]
        return found


def open_input(path: str, split: str) -> Union[JsonlInput, DatasetInput]:
    if os.path.isdir(path):
        return DatasetInput(path, split)
    if os.path.isfile(path):
        return JsonlInput(path)
    raise FileNotFoundError(f"no such input file or directory: {path}")


# ---------------------------------------------------------------------------------------------
# Records -> token pairs


def split_text(text: str, fraction: float) -> tuple[str, str]:
    """Cut a document at the sentence or paragraph end nearest `fraction` of its length.

    Falls back to a word boundary when there is no sentence end; both parts are non-empty.
    The whitespace at the cut starts the continuation, so prefix + continuation == text.
    """
    target = fraction * len(text)
    last = len(text.rstrip())  # a cut before it leaves a non-space continuation
    for boundary in (SENTENCE_OR_PARAGRAPH_END, WORD_END):
        cuts = [m.start() for m in boundary.finditer(text) if m.start() < last]
        if cuts:
            cut = min(cuts, key=lambda c: (abs(c - target), c))
            return text[:cut], text[cut:]
    raise BadRecord("empty_view", "'text' has no sentence or word boundary to split it into two non-empty views")


def _string_field(fields: dict, name: str) -> str:
    if name not in fields:
        raise BadRecord("missing_field", f"missing field '{name}'")
    value = fields[name]
    if not isinstance(value, str):
        raise BadRecord("invalid", f"'{name}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise BadRecord("empty_view", f"empty view: '{name}' is empty")
    return value


MARKS = ("<|megajepa_mark|>",)  # a temporary special token, never stored


class RecordEncoder:
    """One input record -> the schema's sequences (see the module docstring), or BadRecord.

    Every sequence is rendered and tokenized as the reference does: the chat template applied to
    the messages as text, then `tokenizer(text)` with the tokenizer's own special tokens. Where
    the [PRED] tokens go (and where each content starts and ends) is found by rendering the same
    messages with marker tokens at those places: a marker is a special token, so the tokenizer
    splits there exactly as it will split around the [PRED] tokens. A template that rewrites the
    content where the [PRED] tokens go at its end (say it trims trailing whitespace) makes the
    record a bad record: its [PRED] positions would not be the reference's. Where a token at the
    content's front would change the tokens before it, the front position is stored as -1 and
    only jepa.front_pred refuses the record.
    """

    def __init__(
        self,
        tokenizer,
        max_length: int = 512,
        overlength: str = "truncate",
        input_format: str = "auto",
        field_map: Optional[dict] = None,
        text_split: float = 0.5,
    ):
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has no eos_token, which ends each turn and each plain text")
        self.tokenizer = tokenizer
        self.marked = copy.deepcopy(tokenizer)
        self.marked.add_special_tokens({"extra_special_tokens": list(MARKS)}, replace_extra_special_tokens=False)
        self.mark_ids = [self.marked.convert_tokens_to_ids(m) for m in MARKS]
        self.template = chat_template(tokenizer)
        self.max_length = max_length
        # No vocabulary entry is longer (in characters) than the text it stands for, so a content of
        # more than max_length x the longest entry has more than max_length tokens: it is cut there
        # before tokenizing, which keeps the cost of a huge record bounded and changes no token
        # kept (but where a single word crosses the cut) nor the decision to cut or skip.
        self.char_limit = max_length * max(map(len, tokenizer.get_vocab())) if max_length > 0 else 0
        self.overlength = overlength
        self.input_format = input_format
        self.field_map = field_map or {}
        self.text_split = text_split
        self.views_detected = 0  # records whose views came from their own text/code (hellaswag's)

    def __call__(self, record: dict) -> tuple[dict, bool]:
        """(the sample's columns, whether a sequence was cut at max_length)."""
        sample = self._encode(record)
        lengths = {name: len(sample[name]) for name in ("full", "user", "assistant")}
        longest = max(lengths, key=lengths.get)
        cut = self.max_length > 0 and lengths[longest] > self.max_length
        if cut and self.overlength == "skip":
            raise BadRecord(
                "too_long",
                f"the {longest} sequence is longer than --max-length={self.max_length} ({lengths[longest]} tokens or more)",
            )
        if cut:
            for name in ("full", "user", "assistant"):
                sample[name] = sample[name][: self.max_length]
        return sample, cut

    # ---- rendering

    def _bounded(self, messages: list[dict]) -> tuple[list[dict], set[int]]:
        """(the messages with each content cut at char_limit + 1 characters, so still too long; the
        indices of those cut)."""
        cut = {i for i, m in enumerate(messages) if self.char_limit and len(m["content"]) > self.char_limit + 1}
        return [{**m, "content": m["content"][: self.char_limit + 1]} if i in cut else m for i, m in enumerate(messages)], cut

    def _render(self, messages: list[dict], plain: bool) -> str:
        if plain:
            return messages[0]["content"]
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False)

    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def _positions(self, messages: list[dict], marks: list, plain: bool, suffix: str = "") -> tuple[list[int], list[int]]:
        """(tokens of the rendered messages, token index of each mark): a mark is (message index,
        'front' or 'end') of the content it is placed at, and its index is -1 where placing a
        token there changes the tokens around it (the template trims the content, or the text
        before the content merges with it when it is not split off)."""
        messages, cut = self._bounded(messages)
        tokens = self._tokens(self._render(messages, plain) + suffix)
        mark_id = self.mark_ids[0]
        found = []
        for index, side in marks:
            if side == "end" and index in cut:  # past the tokens kept: where exactly makes no difference
                found.append(len(tokens))
                continue
            marked = [dict(m) for m in messages]
            content = marked[index]["content"]
            marked[index]["content"] = MARKS[0] + content if side == "front" else content + MARKS[0]
            ids = self.marked(self._render(marked, plain) + suffix)["input_ids"]
            where = [j for j, t in enumerate(ids) if t == mark_id]
            exact = len(where) == 1 and ids[: where[0]] + ids[where[0] + 1 :] == tokens
            found.append(where[0] if exact else -1)
        return tokens, found

    def _view(self, messages: list[dict], plain: bool) -> tuple[list[int], list[int]]:
        """A view rendered alone; its first message's content gets the [PRED] tokens (the reference
        appends them to user_messages[0]). An unknown front position (-1) refuses front_pred only."""
        tokens, (front, end) = self._positions(messages, [(0, "front"), (0, "end")], plain)
        if end < 0:
            raise BadRecord(
                "template_rewrites_content",
                "the chat template changes the content's tokens when [PRED] tokens are added to it "
                "(leading or trailing whitespace that the template trims?)",
            )
        return tokens, [front, end]

    def _conversation(self, messages: list[dict], user: int, plain: bool) -> tuple[list[int], int, list[int]]:
        """(the conversation's tokens, its prompt length, [user start, user end, assistant start, end))."""
        if plain:  # the reference's --plain --train_all: the user's text and the end of text
            tokens, spans = self._positions([messages[user]], [(0, "front"), (0, "end")], True, self.tokenizer.eos_token)
            return tokens, 0, spans + [-1, -1]
        assistant = len(messages) - 1
        marks = [(user, "front"), (user, "end"), (assistant, "front"), (assistant, "end")]
        tokens, spans = self._positions(messages, marks, False)
        prompt_len = spans[2]
        if prompt_len < 0:  # where the reply starts, from the generation prompt instead
            prompt = self._tokens(
                self.tokenizer.apply_chat_template(
                    self._bounded(messages[:-1])[0], chat_template=self.template, tokenize=False, add_generation_prompt=True
                )
            )
            if tokens[: len(prompt)] != prompt:
                raise BadRecord("template_rewrites_content", "the conversation does not start with its generation prompt")
            prompt_len = len(prompt)
        return tokens, prompt_len, spans

    # ---- records

    def _encode(self, record: dict) -> dict:
        fields = {name: record[name] for name in FIELDS if name in record}
        for name, column in self.field_map.items():  # --field wins over what a record happens to hold
            if column not in record:
                raise BadRecord("missing_field", f"missing field '{column}' (--field {name}={column})")
            fields[name] = record[column]
        if "messages" in fields and not {"view_a", "view_b"} & set(fields) and _views_of_their_own(record):
            fields["view_a"], fields["view_b"] = record["text"], record["code"]
            self.views_detected += 1
        kind = self.input_format if self.input_format != "auto" else self._detect(fields)
        if kind == "text":
            prefix, continuation = split_text(_string_field(fields, "text"), self.text_split)
            messages = [{"role": "user", "content": prefix}, {"role": "assistant", "content": continuation}]
            full, _, _ = self._conversation([{"role": "user", "content": prefix + continuation}], 0, True)
            return self._sample(full, 0, [-1, -1, -1, -1], [messages[:1], messages[1:]], True)
        if kind == "pair" and "messages" not in fields:
            messages = [
                {"role": "user", "content": _string_field(fields, "view_a")},
                {"role": "assistant", "content": _string_field(fields, "view_b")},
            ]
        else:
            messages = _messages(fields.get("messages"), "messages")
        user = _last_user(messages)
        views = [
            _view_messages(fields["view_a"], "view_a", "user") if "view_a" in fields else [messages[user]],
            _view_messages(fields["view_b"], "view_b", "assistant") if "view_b" in fields else [messages[-1]],
        ]
        plain = kind == "plain"
        full, prompt_len, spans = self._conversation(messages, user, plain)
        return self._sample(full, prompt_len, spans, views, plain)

    def _sample(self, full, prompt_len, spans, views, plain: bool) -> dict:
        (user, user_insert), (assistant, assistant_insert) = (self._view(v, plain) for v in views)
        return {
            "full": np.asarray(full, dtype=np.int32),
            "prompt_len": prompt_len,
            "full_spans": np.asarray(spans, dtype=np.int32),
            "user": np.asarray(user, dtype=np.int32),
            "user_insert": np.asarray(user_insert, dtype=np.int32),
            "assistant": np.asarray(assistant, dtype=np.int32),
            "assistant_insert": np.asarray(assistant_insert, dtype=np.int32),
        }

    @staticmethod
    def _detect(fields: dict) -> str:
        if "messages" in fields:
            return "chat"
        if "view_a" in fields or "view_b" in fields:
            return "pair"
        if "text" in fields:
            return "text"
        raise BadRecord("missing_field", "no 'messages', 'view_a'/'view_b' or 'text' field (see --format, --field)")


def _views_of_their_own(record: dict) -> bool:
    """Whether a chat record carries the reference's own views beside `messages`: message lists
    under `text` and `code` (hellaswag's, whose messages' last user turn and reply are the question
    and a letter A-D: the reference's JEPA views are text and code)."""
    return all(
        isinstance(record.get(name), list) and record[name] and all(isinstance(m, dict) for m in record[name])
        for name in ("text", "code")
    )


def _messages(value, name: str) -> list[dict]:
    """A validated list of {role, content} messages."""
    if value is None:
        raise BadRecord("missing_field", f"missing field '{name}'")
    if not isinstance(value, list) or not value:
        raise BadRecord("invalid", f"'{name}' must be a non-empty list of messages")
    turns = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise BadRecord("invalid", f"{name}[{i}] is not an object")
        for key in ("role", "content"):
            if key not in message:
                raise BadRecord("missing_field", f"{name}[{i}]: missing '{key}'")
        if message["role"] not in ROLES:
            raise BadRecord("invalid", f"{name}[{i}]: unknown role {message['role']!r} (expected {', '.join(ROLES)})")
        if not isinstance(message["content"], str):
            raise BadRecord("invalid", f"{name}[{i}]: 'content' must be a string")
        if not message["content"].strip():
            raise BadRecord("empty_view", f"{name}[{i}]: the {message['role']} content is empty")
        turns.append({"role": message["role"], "content": message["content"]})
    return turns


def _last_user(messages: list[dict]) -> int:
    """Index of the user turn the JEPA views come from; the last message must be the assistant's."""
    if messages[-1]["role"] != "assistant":
        raise BadRecord("invalid", f"the last message must be the assistant's, not the {messages[-1]['role']}'s")
    users = [i for i, m in enumerate(messages[:-1]) if m["role"] == "user"]
    if not users:
        raise BadRecord("invalid", "no user message before the assistant's")
    return users[-1]


def _view_messages(value, name: str, role: str) -> list[dict]:
    """A view field: a string (one message of `role`) or a list of messages (hellaswag's text/code)."""
    if isinstance(value, str):
        if not value.strip():
            raise BadRecord("empty_view", f"empty view: '{name}' is empty")
        return [{"role": role, "content": value}]
    return _messages(value, name)


# ---------------------------------------------------------------------------------------------
# The run


def _percentiles(lengths: list[int]) -> dict[str, int]:
    values = np.asarray(lengths)
    stats = {f"p{q}": int(np.percentile(values, q, method="inverted_cdf")) for q in (50, 90, 99)}
    stats["max"] = int(values.max())
    return stats


class _SkipReporter:
    """Counts skipped records by reason; prints the first MAX_REPORTED as `SOURCE: reason`."""

    def __init__(self):
        self.counts: Counter = Counter()

    def __call__(self, message: str, reason: str) -> None:
        self.counts[reason] += 1
        if sum(self.counts.values()) <= MAX_REPORTED:
            tqdm.write(message, file=sys.stderr)

    def close(self) -> None:
        hidden = sum(self.counts.values()) - MAX_REPORTED
        if hidden > 0:
            print(f"... and {hidden} more skipped records", file=sys.stderr)


def _write_records(sources, encoder: RecordEncoder, writer, strict: bool, skip: _SkipReporter, progress: bool):
    """Encode and write every usable record; (records read, sequence lengths by name, records cut)."""
    lengths: dict[str, list[int]] = {"full": [], "user": [], "assistant": []}
    read = cut = 0
    with tqdm(total=sum(len(s) for s in sources), unit="record", desc="prepare", disable=not progress) as bar:
        for source_input in sources:
            for source, record in source_input:
                read += 1
                bar.update()
                try:
                    if isinstance(record, BadRecord):
                        raise record
                    sample, was_cut = encoder(record)
                except BadRecord as bad:
                    message = f"{source}: {bad}"
                    if strict:
                        raise BadInput(message) from None
                    skip(message, bad.reason)
                    continue
                cut += was_cut
                writer.write({"sample_id": len(lengths["full"]), **sample, "source": source})
                for name, values in lengths.items():
                    values.append(len(sample[name]))
    return read, lengths, cut


def prepare(
    inputs: Iterable[str],
    out_dir: str,
    tokenizer_dir: Optional[str] = None,
    *,
    strict: bool = False,
    max_length: int = 512,
    overlength: str = "truncate",
    shard_size_limit: int = 1 << 26,
    input_format: str = "auto",
    field_map: Optional[dict[str, str]] = None,
    text_split: float = 0.5,
    split: str = "train",
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Tokenize `inputs` into MDS shards + fingerprint.json at out_dir; return the summary.

    Raises BadInput (a bad record under strict, or no usable record), FileNotFoundError,
    FileExistsError (out_dir not empty and not overwrite) or ValueError (bad options).
    """
    inputs = list(inputs)
    if not inputs:
        raise ValueError("no inputs given")
    if input_format not in FORMATS:
        raise ValueError(f"input_format {input_format!r}: expected one of {', '.join(FORMATS)}")
    if overlength not in OVERLENGTH:
        raise ValueError(f"overlength {overlength!r}: expected one of {', '.join(OVERLENGTH)}")
    unknown = sorted(set(field_map or {}) - set(FIELDS))
    if unknown:
        raise ValueError(f"--field {unknown[0]}=...: the name must be one of {', '.join(FIELDS)}")
    if not 0.0 < text_split < 1.0:
        raise ValueError(f"text_split={text_split}: expected a fraction strictly between 0 and 1")
    if max_length < 0:
        raise ValueError(f"max_length={max_length}: expected 0 (no limit) or a positive number of tokens")
    # imported here, not at the top: `megajepa prepare --help` and argument errors stay instant
    from streaming import MDSWriter

    from megajepa.data.loader import write_record_lengths
    from megajepa.data.shard_hashes import SHARD_HASHES

    with staged_directory(out_dir, overwrite) as staging:
        sources = [open_input(path, split) for path in inputs]
        tokenizer = load_tokenizer(tokenizer_dir)
        encoder = RecordEncoder(tokenizer, max_length, overlength, input_format, field_map, text_split)
        skip = _SkipReporter()
        started = time.perf_counter()
        writer = MDSWriter(
            out=staging, columns=COLUMNS, compression="zstd", hashes=SHARD_HASHES, size_limit=shard_size_limit
        )
        try:
            read, lengths, cut = _write_records(sources, encoder, writer, strict, skip, progress)
            if not lengths["full"]:
                raise BadInput(f"no usable records in {', '.join(inputs)} ({read} read, all skipped)")
            writer.finish()
        except BaseException:
            writer.cancel_future_jobs()
            raise
        finally:
            skip.close()
        if encoder.views_detected:
            print(f"megajepa prepare: {encoder.views_detected} record(s) hold views of their own (`text`, `code` "
                  "message lists, as the reference's hellaswag): used as view_a and view_b "
                  "(--field view_a=COLUMN --field view_b=COLUMN to take others)", file=sys.stderr)
        written = len(lengths["full"])
        fingerprint = {
            "format_version": FORMAT_VERSION,
            "tokenizer_hash": tokenizer_hash(tokenizer),
            "vocab_size": len(tokenizer),
            "eos_token_id": tokenizer.eos_token_id,
            "chat_template": chat_template(tokenizer),
            "columns": COLUMNS,
            "sources": {path: file_sha256(path) for s in sources for path in s.files()},
            "options": {
                "input_format": input_format,
                "field_map": dict(sorted((field_map or {}).items())),
                "text_split": text_split,
                "split": split,
                "overlength": overlength,
            },
            "max_length": max_length,
            "counts": {
                "read": read,
                "written": written,
                "truncated": cut,
                "skipped": dict(sorted(skip.counts.items())),
            },
            "token_lengths": {name: _percentiles(values) for name, values in lengths.items()},
        }
        # the token-budget loader's costs, so it need not read every record
        write_record_lengths(staging, np.stack([lengths[name] for name in ("full", "user", "assistant")], axis=1))
        write_fingerprint(staging, fingerprint)
    seconds = time.perf_counter() - started
    summary = {**fingerprint, "out": out_dir, "seconds": seconds, "records_per_second": written / seconds}
    if progress:
        print(format_summary(summary))
    return summary


def format_summary(summary: dict) -> str:
    counts = summary["counts"]
    skipped = ", ".join(f"{reason} {n}" for reason, n in counts["skipped"].items()) or "none"
    lines = [
        f"prepared {counts['written']} records -> {summary['out']}  "
        f"(read {counts['read']}, cut at {summary['max_length']} tokens: {counts['truncated']}, skipped: {skipped})",
        f"  {'tokens':8} {'p50':>6} {'p90':>6} {'p99':>6} {'max':>6}",
    ]
    for name, stats in summary["token_lengths"].items():
        lines.append(f"  {name:8} " + " ".join(f"{stats[k]:>6}" for k in ("p50", "p90", "p99", "max")))
    lines.append(f"  {summary['records_per_second']:.0f} records/s ({summary['seconds']:.1f} s)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line


def _field_mapping(text: str) -> tuple[str, str]:
    name, sep, column = text.partition("=")
    if not sep or not column or name not in FIELDS:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=COLUMN with NAME one of {', '.join(FIELDS)}")
    return name, column


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megajepa prepare",
        description="Tokenize view pairs (chat / view_a+view_b / text JSONL, or a local HF dataset) into MDS shards.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="JSONL file or local HF dataset directory")
    parser.add_argument("--out", required=True, metavar="DIR", help="output shard directory (created atomically)")
    parser.add_argument("--tokenizer", metavar="DIR", help="HF tokenizer directory (default: the embedded one)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad record (exit code 2)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument(
        "--max-length", type=int, default=512, help="longest sequence, in tokens (0: no limit; default 512, the reference's)"
    )
    parser.add_argument(
        "--overlength", choices=OVERLENGTH, default="truncate",
        help="a longer sequence: truncate (cut it, keep the record: the reference) or skip the record",
    )
    parser.add_argument("--shard-size", type=int, default=1 << 26, metavar="BYTES", help="shard size limit")
    parser.add_argument("--format", choices=FORMATS, default="auto", help="record format (default: per record)")
    parser.add_argument(
        "--field", type=_field_mapping, action="append", default=[], metavar="NAME=COLUMN",
        help=f"take NAME ({', '.join(FIELDS)}) from COLUMN; repeatable",
    )
    parser.add_argument("--text-split", type=float, default=0.5, help="where to cut text documents (fraction)")
    parser.add_argument("--split", default="train", help="split of an HF DatasetDict input")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or summary")
    return parser


def exit_code(command: str, work: Callable[[], object], out_dir: str) -> int:
    """Runs one prepare command's `work` writing `out_dir`: 0, or 2 with the reason on stderr, no
    traceback, for input it cannot use or a full disk. BadInput's message names the record already
    (FILE:LINE: reason); the other errors get the command's name in front, as argparse's do. Shared
    by prepare and prepare-text."""
    try:
        work()
    except BadInput as err:
        print(err, file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"{command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        # a file in the staging directory (removed by now) is the output's disk that is full
        staged = err.filename is None or os.path.abspath(err.filename).startswith(os.path.abspath(out_dir) + ".tmp-")
        print(f"{command}: error: no space left on device: {out_dir if staged else err.filename}", file=sys.stderr)
        return 2
    return 0


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through staged_directory, which removes its staging


def main(argv: list[str], default_tokenizer: Optional[Callable[[], str]] = None) -> int:
    """`megajepa prepare`; `default_tokenizer` gives the directory used without --tokenizer (the
    command line passes the embedded one's builder, so that this module need not import it)."""
    args = build_parser().parse_args(argv)
    if args.tokenizer is None and default_tokenizer is None:
        print("megajepa prepare: error: --tokenizer DIR is required", file=sys.stderr)
        return 2
    missing = [path for path in args.inputs if not os.path.exists(path)]
    if missing:  # before the default tokenizer is built, which takes a while the first time
        print(f"megajepa prepare: error: no such input file or directory: {', '.join(missing)}", file=sys.stderr)
        return 2
    tokenizer = args.tokenizer
    if tokenizer is None:
        tokenizer = default_tokenizer()
        print(f"megajepa prepare: no --tokenizer: using the demo tokenizer at {tokenizer}", file=sys.stderr)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    return exit_code("megajepa prepare", lambda: prepare(
        args.inputs,
        args.out,
        tokenizer,
        strict=args.strict,
        max_length=args.max_length,
        overlength=args.overlength,
        shard_size_limit=args.shard_size,
        input_format=args.format,
        field_map=dict(args.field),
        text_split=args.text_split,
        split=args.split,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    ), args.out)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
