"""Conversations (``corpus.format: chat``): reading, checking, rendering with each model's chat template, and
which tokens are the assistant's (host only, never JAX).

A conversation is a list of messages ``{"role": "system" | "user" | "assistant", "content": str}``, read from
``{"messages": [{"role", "content"}, ...]}`` or ShareGPT's ``{"conversations": [{"from", "value"}, ...]}``
(``from``: ``system``, ``human`` / ``user``, ``gpt`` / ``assistant``). A corpus block of a chat corpus holds
a run of consecutive messages of one conversation as JSON in its ``text`` (:func:`block_messages`); every
stage renders it with its *own* model's template (:func:`encode`), so a source sees its own system prompt,
role headers and special tokens.

Assistant tokens are found by character offsets, whatever the template: each message's content (or, for
templates that ``trim`` it, its stripped content) is looked for in the rendered text after the previous one;
a template that drops a message's content is an error. The tokens whose characters overlap an assistant
message's content are that message's span; losses score only the positions that predict them and the token right
after each span, the template's end of turn, so that a model learns to stop (:func:`scored_positions`). The
alignment pairs tokens span by span (:mod:`fusejax.align`), so template tokens are never aligned to content
tokens.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def messages_of(obj, where: str) -> list[dict[str, str]]:
    """The checked messages of one conversation record ``obj`` (a dict read from JSONL or a dataset row);
    ValueError naming ``where`` and the field for: no ``messages``/``conversations`` list, a message that is
    no ``{role, content}`` (``{from, value}``) of strings, an unknown role, an empty assistant message, or no
    assistant message at all."""
    if not isinstance(obj, dict) or not isinstance(obj.get("messages", obj.get("conversations")), list):
        raise ValueError(f"{where}: expected an object with a 'messages' or 'conversations' list")
    sharegpt = "messages" not in obj
    keys = ("from", "value") if sharegpt else ("role", "content")
    field = "conversations" if sharegpt else "messages"
    out = []
    for n, message in enumerate(obj[field]):
        here = f"{where}: {field}[{n}]"
        if not isinstance(message, dict) or not all(isinstance(message.get(k), str) for k in keys):
            raise ValueError(f"{here}: expected {{{keys[0]!r}: str, {keys[1]!r}: str}}, got {message!r:.80}")
        role, content = message[keys[0]], message[keys[1]]
        role = SHAREGPT_ROLES.get(role) if sharegpt else (role if role in ROLES else None)
        if role is None:
            known = sorted(SHAREGPT_ROLES) if sharegpt else list(ROLES)
            raise ValueError(f"{here}.{keys[0]}: unknown role {message[keys[0]]!r} (known: {known})")
        if role == "assistant" and not content.strip():
            raise ValueError(f"{here}.{keys[1]}: empty assistant message")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError(f"{where}: {field} has no assistant message (nothing to train on)")
    return out


def chat_tokenizer(path, template_file: str | None, key: str):
    """The tokenizer of folder ``path`` with its chat template: the Jinja file ``template_file`` when given, else
    the tokenizer's own ``chat_template``; ValueError naming ``key`` (e.g. ``source 'a'``) when it has
    neither or the file cannot be read as UTF-8. ``tok.chat_template_name`` says where the template is from."""
    from fusejax.tokenizer import load_tokenizer

    tok = load_tokenizer(path)
    tok.chat_template_name = f"the chat_template of tokenizer {path}"
    if template_file:
        try:
            tok.chat_template = Path(template_file).read_text("utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"{key}: cannot read its chat_template {template_file}: {err}") from None
        tok.chat_template_name = f"chat_template {template_file}"
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"{key}: tokenizer {path} has no chat_template; set its chat_template to a Jinja file")
    return tok


def template_hash(tok) -> str:
    """sha256 hex of ``tok``'s chat template (recorded in store metas: another template gives other ids)."""
    return hashlib.sha256(str(tok.chat_template).encode("utf-8")).hexdigest()


def is_chat(corpus_meta: dict) -> bool:
    """Whether a corpus store with this meta holds conversations (written with ``corpus.format: chat``)."""
    return "chat_template" in corpus_meta


def block_messages(block_text: bytes | str) -> list[dict[str, str]]:
    """The messages stored in a chat corpus block's ``text``."""
    return json.loads(block_text)


def _content_spans(text: str, messages: list[dict[str, str]], where: str) -> list[tuple[int, int]]:
    """Character span of each assistant message's content in the rendered ``text``, in order."""
    spans, cursor = [], 0
    for n, m in enumerate(messages):
        content = m["content"]
        if not content.strip():  # an empty system or user message: nothing to find
            continue
        for needle in (content, content.strip()):
            at = text.find(needle, cursor)
            if at >= 0:
                break
        else:
            raise ValueError(f"{where}: the chat template drops or rewrites the content of message {n} "
                             f"({m['role']}: {content[:40]!r}); use a template that keeps message content")
        cursor = at + len(needle)
        if m["role"] == "assistant":
            spans.append((at, cursor))
    return spans


def encode(tok, messages: list[dict[str, str]], where: str = "conversation") -> tuple[np.ndarray, np.ndarray]:
    """``messages`` rendered with ``tok``'s chat template and tokenized as every stage sees them (no EOS or BOS
    added: the template has its own). Returns ``(ids [T] int64, spans [A, 2] int64)``: the token range
    ``[a, b)`` of each assistant message's content (tokens whose characters overlap it). A template that does
    not compile or raises (``raise_exception``) is a ValueError naming ``where`` and the template."""
    from jinja2 import TemplateError, TemplateSyntaxError

    try:
        text = tok.apply_chat_template(messages, tokenize=False)
    except TemplateError as err:
        line = f" (template line {err.lineno})" if isinstance(err, TemplateSyntaxError) else ""
        name = getattr(tok, "chat_template_name", "the chat template")
        raise ValueError(f"{where}: {name} failed{line}: {err}") from None
    chars = _content_spans(text, messages, where)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    offsets = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)
    real = offsets[:, 1] > offsets[:, 0]
    spans = []
    for cs, ce in chars:
        inside = np.flatnonzero(real & (offsets[:, 1] > cs) & (offsets[:, 0] < ce))
        spans.append((inside[0], inside[-1] + 1))
    return np.asarray(enc["input_ids"], np.int64), np.asarray(spans, np.int64).reshape(-1, 2)


def scored_positions(length: int, spans: np.ndarray, *, end_of_turn: bool = True) -> np.ndarray:
    """``[length]`` bool: position t is scored when token t + 1 is in an assistant span (t predicts it) or, with
    ``end_of_turn``, is the token right after one (the template's end of turn: ``<|im_end|>``, ``<|eot_id|>``...;
    none when the span ends the text). ``end_of_turn=False``: content tokens only (the sources' CE)."""
    out = np.zeros(length, bool)
    for a, b in spans:
        out[max(a - 1, 0):b - 1 + int(end_of_turn and b < length)] = True
    return out


def assistant_bytes(messages: list[dict[str, str]]) -> int:
    """UTF-8 bytes of the assistant messages' content (the denominator of assistant bits per byte)."""
    return sum(len(m["content"].encode("utf-8")) for m in messages if m["role"] == "assistant")


def system_prefix(messages: list[dict[str, str]]) -> int:
    """How many system messages lead the conversation (every block of it repeats them)."""
    return next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))


def split_conversation(messages: list[dict[str, str]], tok, block_size: int, where: str
                       ) -> tuple[list[tuple[int, int, list[dict[str, str]]]], dict[str, int]]:
    """Cut a conversation at turn boundaries into runs of messages that render to <= ``block_size`` tokens of
    ``tok``; a run repeats the conversation's leading system messages and ends with an assistant message. A turn
    (the messages up to and including its assistant answer) that does not fit alone is cut: its last assistant
    message keeps the longest prefix of its content (in characters) with which the turn fits, the template's
    end of turn included; a turn whose prompt does not fit even with a one-character answer is dropped.
    Returns ``([(first, end, run messages)], {"cut_turns": n, "dropped_turns": n})``: ``[first, end)`` the
    message index range after the system prefix."""
    head = system_prefix(messages)
    ends = [i + 1 for i in range(head, len(messages)) if messages[i]["role"] == "assistant"
            and (i + 1 == len(messages) or messages[i + 1]["role"] != "assistant")]

    def fits(run: list[dict[str, str]]) -> bool:
        return len(encode(tok, messages[:head] + run, where)[0]) <= block_size

    runs, counts, first = [], {"cut_turns": 0, "dropped_turns": 0}, head
    while ends:
        end = None
        for e in ends:  # the longest run that fits
            if not fits(messages[first:e]):
                break
            end = e
        if end is not None:
            runs.append((first, end, messages[:head] + messages[first:end]))
        else:  # the first turn alone is too long: cut its answer, or drop it
            end = ends[0]
            turn = messages[first:end]
            content = turn[-1]["content"]

            def answered(c: int) -> list[dict[str, str]]:
                return turn[:-1] + [{"role": "assistant", "content": content[:c]}]

            lo, hi = len(content) - len(content.lstrip()) + 1, len(content)  # the shortest answer, the whole
            if fits(answered(lo)):
                while hi - lo > 1:  # fits(answered(lo)) and not fits(answered(hi))
                    mid = (lo + hi) // 2
                    lo, hi = (mid, hi) if fits(answered(mid)) else (lo, mid)
                runs.append((first, end, messages[:head] + answered(lo)))
                counts["cut_turns"] += 1
            else:
                counts["dropped_turns"] += 1
        first = end
        ends = [e for e in ends if e > first]
    return runs, counts
