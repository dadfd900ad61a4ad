import json

import pytest
from transformers import AutoTokenizer

from megajepa.data.fingerprint import tokenizer_hash
from megajepa.data.synthetic import generate
from megajepa.data.tokenizer import (
    DEFAULT_CHAT_TEMPLATE,
    PRED_TOKEN_FORMAT,
    add_pred_tokens,
    pad_token_id,
    pred_token_ids,
    split_conversation,
    train_tokenizer,
)

SPECIAL = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"] + [
    PRED_TOKEN_FORMAT.format(i) for i in range(8)
]
VOCAB = 400


def texts_of(records):
    return [m["content"] for r in records for m in r["messages"]]


@pytest.fixture(scope="module")
def conversations(tmp_path_factory):
    paths = generate(str(tmp_path_factory.mktemp("jsonl")), seed=1, n_train=300, n_eval=30)
    with open(paths["train"]) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, conversations):
    out = str(tmp_path_factory.mktemp("tokenizer"))
    train_tokenizer(texts_of(conversations), out, vocab_size=VOCAB)
    return out


@pytest.fixture
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)  # fresh: some tests add tokens


def test_loads_as_hf_tokenizer_with_special_tokens(tokenizer):
    assert len(tokenizer) <= VOCAB
    assert tokenizer.eos_token == "<|end|>"
    assert tokenizer.pad_token == "<|pad|>"
    for token in SPECIAL:
        ids = tokenizer.encode(token, add_special_tokens=False)
        assert len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids) == [token]
    # A byte-level BPE has no unknown token: any text survives a round trip.
    text = "zq\u00e9\u4e2d [^x]{3,} \t tab"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_training_is_deterministic(tmp_path, conversations, tokenizer):
    again = train_tokenizer(texts_of(conversations), str(tmp_path / "again"), vocab_size=VOCAB)
    assert tokenizer_hash(again) == tokenizer_hash(tokenizer)


def test_the_hash_is_what_decides_token_ids(tmp_path, tokenizer):
    """A tokenizer saved after a call with truncation and padding (as the reference's finetune.py
    saves it) keeps its hash; another vocabulary does not."""
    before = tokenizer_hash(tokenizer)
    tokenizer("a b c", truncation=True, max_length=4, padding="max_length")
    tokenizer.save_pretrained(tmp_path / "saved")
    saved = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert "truncation" in saved.backend_tokenizer.to_str() and saved.backend_tokenizer.truncation is not None
    assert tokenizer_hash(saved) == before
    saved.add_tokens(["<|new|>"])
    assert tokenizer_hash(saved) != before


def test_chat_template(tokenizer):
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
    ]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert full == "<|system|>\nS<|end|>\n<|user|>\nU<|end|>\n<|assistant|>\nA<|end|>\n"
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|system|>\nS<|end|>\n<|user|>\nU<|end|>\n<|assistant|>\n"


def test_split_conversation_views_concatenate_to_the_full_rendering(tokenizer, conversations):
    for record in conversations:
        view_a, view_b = split_conversation(tokenizer, record["messages"])
        full = tokenizer.apply_chat_template(record["messages"], tokenize=False)
        assert view_a + view_b == tokenizer.encode(full, add_special_tokens=False)
        assert tokenizer.decode(view_a).endswith("<|assistant|>\n")
        assert tokenizer.decode(view_b) == record["messages"][2]["content"] + "<|end|>\n"


def test_split_conversation_multi_turn_keeps_earlier_answers_in_view_a(tokenizer):
    messages = [
        {"role": "user", "content": "lines with a digit"},
        {"role": "assistant", "content": ".*[0-9].*"},
        {"role": "user", "content": "lines starting with a vowel"},
        {"role": "assistant", "content": "[AEIOUaeiou].*"},
    ]
    view_a, view_b = split_conversation(tokenizer, messages)
    assert ".*[0-9].*<|end|>" in tokenizer.decode(view_a)
    assert tokenizer.decode(view_b) == "[AEIOUaeiou].*<|end|>\n"


def test_split_conversation_errors(tokenizer):
    with pytest.raises(ValueError, match="last message must be the assistant"):
        split_conversation(tokenizer, [{"role": "user", "content": "x"}])
    # A template that puts something before the conversation only in the generation prompt.
    tokenizer.chat_template = (
        "{% if add_generation_prompt %}PROMPT:{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(ValueError, match="generation prompt as its prefix"):
        split_conversation(tokenizer, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}])


def test_default_template_uses_the_tokenizers_own_eos(tokenizer):
    tokenizer.chat_template = None
    tokenizer.add_special_tokens({"eos_token": "</s>"})
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    view_a, view_b = split_conversation(tokenizer, messages)
    assert tokenizer.decode(view_b) == "a</s>\n"
    assert tokenizer.decode(view_a + view_b) == tokenizer.apply_chat_template(
        messages, chat_template=DEFAULT_CHAT_TEMPLATE, tokenize=False
    )


def test_pred_tokens(tokenizer):
    ids = pred_token_ids(tokenizer, 3)
    assert ids == tokenizer.convert_tokens_to_ids(["<|pred_0|>", "<|pred_1|>", "<|pred_2|>"])
    with pytest.raises(KeyError, match=r"<\|pred_8\|>.*add_pred_tokens"):
        pred_token_ids(tokenizer, 9)
    before = len(tokenizer)
    assert add_pred_tokens(tokenizer, 10) == 2
    assert len(tokenizer) == before + 2
    assert pred_token_ids(tokenizer, 10)[8:] == [before, before + 1]
    assert add_pred_tokens(tokenizer, 10) == 0
    # Added as special tokens: never split, never merged with neighbours.
    assert tokenizer.encode("x<|pred_9|>y", add_special_tokens=False)[1] == before + 1


def test_one_pad_id_rule_for_training_bench_and_eval(tokenizer):
    """The pad token, else the eos token (a GPT-2-like tokenizer), else 0; megajepa eval used to give
    None for a tokenizer with neither."""
    assert pad_token_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|pad|>")
    tokenizer.pad_token = None
    assert pad_token_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|end|>")
    tokenizer.eos_token = None
    assert pad_token_id(tokenizer) == 0
