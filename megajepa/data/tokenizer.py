"""The embedded tokenizer, [PRED] tokens, and splitting a conversation into its two views.

The embedded tokenizer is a byte-level BPE (any text encodes, no unknown token) trained on the
embedded data and saved as a Hugging Face tokenizer directory. Its special tokens:

    <|pad|>                              padding (pad_token)
    <|bos|>                              reserved; the chat template does not use it
    <|end|>                              end of a turn; the eos_token, so generation stops there
    <|system|> <|user|> <|assistant|>    role headers
    <|pred_0|> .. <|pred_7|>             reserved [PRED] tokens for the `tokens` predictor

Chat template (DEFAULT_CHAT_TEMPLATE, stored in the tokenizer config), one block per message:

    <|system|>\\n{content}<|end|>\\n<|user|>\\n{content}<|end|>\\n<|assistant|>\\n{content}<|end|>\\n

and the generation prompt `<|assistant|>\\n`. For a foreign tokenizer without a template the same
template renders with that tokenizer's own eos token (the role headers are then plain text).
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

PAD, BOS, END = "<|pad|>", "<|bos|>", "<|end|>"
ROLES = ("system", "user", "assistant")
ROLE_HEADERS = tuple(f"<|{role}|>" for role in ROLES)
PRED_TOKEN_FORMAT = "<|pred_{}|>"
RESERVED_PRED_TOKENS = 8

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role'] + ': expected system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def _pred_tokens(k: int) -> list[str]:
    return [PRED_TOKEN_FORMAT.format(i) for i in range(k)]


def train_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = 2048):
    """Train the byte-level BPE on `texts` and save it as an HF tokenizer directory at out_dir
    (a PreTrainedTokenizerFast; transformers is imported here, not by `megajepa prepare --help`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = [PAD, BOS, END, *ROLE_HEADERS, *_pred_tokens(RESERVED_PRED_TOKENS)]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=END,
        extra_special_tokens=[*ROLE_HEADERS, *_pred_tokens(RESERVED_PRED_TOKENS)],
    )
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def pred_token_ids(tokenizer, k: int) -> list[int]:
    """The ids of <|pred_0|> .. <|pred_{k-1}|>; a clear error when the tokenizer lacks any."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in _pred_tokens(k) if t not in vocab]
    if missing:
        raise KeyError(
            f"the tokenizer has no [PRED] token(s) {', '.join(missing)} (jepa.k={k}); "
            f"add them with megajepa.data.tokenizer.add_pred_tokens(tokenizer, {k})"
        )
    return [vocab[t] for t in _pred_tokens(k)]


def pad_token_id(tokenizer) -> int:
    """The id packed rows and batched generation pad with: the pad token, else the eos token, else 0
    (a tokenizer with neither; the padding is masked out either way)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id or 0


def add_pred_tokens(tokenizer, k: int) -> int:
    """Add the missing [PRED] tokens as special tokens; return how many were added.

    The model's embeddings must then be resized to len(tokenizer).
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in _pred_tokens(k) if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    return len(missing)


def chat_template(tokenizer) -> str:
    """The template conversations are rendered with: the tokenizer's own, else the default."""
    return tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of `text`, no special tokens added; straight to the Rust tokenizer when there is one
    (the same ids as tokenizer.encode(text, add_special_tokens=False), without its Python overhead)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer.encode(text, add_special_tokens=False)
    return backend.encode(text, add_special_tokens=False).ids


def split_conversation(tokenizer, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
    """(view A, view B) token ids of a chat whose last message is the assistant's.

    View A is the conversation up to and including the assistant header (the generation prompt),
    view B the assistant content and whatever the template puts after it (the end-of-turn token).
    """
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("the last message must be the assistant's")
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no eos_token, which ends each turn of the chat template")
    template = chat_template(tokenizer)
    prompt = tokenizer.apply_chat_template(
        list(messages[:-1]), chat_template=template, tokenize=False, add_generation_prompt=True
    )
    full = tokenizer.apply_chat_template(list(messages), chat_template=template, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError(
            "the chat template renders the conversation without the generation prompt as its prefix "
            f"(prompt ends {prompt[-40:]!r}, conversation continues {full[len(prompt) - 40:len(prompt)]!r}); "
            "view A cannot be split off"
        )
    return encode_text(tokenizer, prompt), encode_text(tokenizer, full[len(prompt):])


def load_tokenizer(path: str):
    """A local HF tokenizer directory (no hub access)."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer: no such directory: {path}")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)
