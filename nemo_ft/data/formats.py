"""Input formats: streaming line reader, per-file format detection, key aliases, and conversion
of one JSON row into a canonical example.

Canonical examples are plain dicts of one of three kinds, whatever the input looked like:
  sft:  {"input": str, "output": str}
  chat: {"system": str, "turns": [[role, text], ...]}   roles are NeMo's "User"/"Assistant"
  pref: {"prompt": str, "chosen": str, "rejected": str, "context": (system, turns) or None}
        (prompt is the plain rendering; context keeps a chat-shaped prompt's turns for other renderings)
A row that cannot be converted raises RowReject(reason, detail); the pipeline counts it.
"""
import gzip
import json
from typing import Iterator, Optional, Tuple

from nemo_ft.data.errors import REASONS, PrepError, RowReject  # noqa: F401  (REASONS re-exported)
from nemo_ft.data.normalize import clean_text, dedup_text
from nemo_ft.data.tokenize import CHAT_SYSTEM, CHAT_TOKENS

# format name -> (kind, required keys, optional keys). Order matters for detection: the most
# specific key sets first ({prompt, chosen_response} before {prompt, completion}, etc.).
FORMATS = {
    "aligner_dpo": ("pref", ("prompt", "chosen_response", "rejected_response"), ()),
    "preference": ("pref", ("chosen", "rejected"), ("prompt",)),
    "openai": ("chat", ("messages",), ()),
    "sharegpt": ("chat", ("conversations",), ("system",)),
    "alpaca": ("sft", ("instruction", "output"), ("input",)),
    "prompt_completion": ("sft", ("prompt", "completion"), ()),
    "nemo_sft": ("sft", ("input", "output"), ()),
}

# Other spellings of the same key seen in public datasets (Dolly, HF "response"/"text").
KEY_ALIASES = {
    "alpaca": {"response": "output", "context": "input"},
    "prompt_completion": {"response": "completion"},
    "nemo_sft": {"answer": "output"},
}

ROLE_ALIASES = {
    "user": "User", "human": "User", "User": "User",
    "assistant": "Assistant", "gpt": "Assistant", "bot": "Assistant", "model": "Assistant",
    "Assistant": "Assistant", "system": "system", "System": "system",
}

TASK_KINDS = {"sft": ("sft", "chat"), "chat": ("sft", "chat"), "dpo": ("pref",), "rm": ("pref",),
              "rlhf": ("sft", "chat", "pref")}


def read_lines(path: str) -> Iterator[Tuple[int, bytes]]:
    """(1-based line number, raw bytes without the line end) for each physical line.

    Binary on purpose: a bad UTF-8 byte must reject one row, not abort the file. CRLF and a
    UTF-8 BOM on the first line are stripped here, so every later check sees clean lines.
    """
    opener = gzip.open if path.endswith(".gz") else open
    try:
        f = opener(path, "rb")
    except OSError as err:
        raise PrepError(f"cannot open input: {err.strerror or err}", path=path) from None
    with f:
        for lineno, raw in enumerate(f, 1):
            if raw.endswith(b"\n"):
                raw = raw[:-1]
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            yield lineno, raw


def parse_line(raw: bytes) -> dict:
    if not raw.strip():
        raise RowReject("blank_line", "empty or whitespace-only line")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RowReject("invalid_utf8", f"byte {err.start}: {err.reason}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise RowReject("invalid_json", f"column {err.colno}: {err.msg}") from None
    if not isinstance(obj, dict):
        raise RowReject("not_object", f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _aliased(obj: dict, fmt: str) -> dict:
    aliases = KEY_ALIASES.get(fmt)
    if not aliases:
        return obj
    out = dict(obj)
    for alt, key in aliases.items():
        if key not in out and alt in out:
            out[key] = out.pop(alt)
    return out


def detect_format(obj: dict) -> Optional[str]:
    for name, (_, required, _) in FORMATS.items():
        o = _aliased(obj, name)
        if all(k in o for k in required):
            return name
    return None


def _text(obj: dict, key: str, required: bool = True) -> str:
    if key not in obj or obj[key] is None:
        if required:
            raise RowReject("missing_key", f"key {key!r} is missing")
        return ""
    value = obj[key]
    if not isinstance(value, str):
        raise RowReject("wrong_type", f"key {key!r}: expected a string, got {type(value).__name__}")
    value = clean_text(value)
    if required and not value.strip():
        raise RowReject("empty_value", f"key {key!r} is empty")
    return value


def _turns(items, key: str, role_key: str, text_key: str):
    if not isinstance(items, list):
        raise RowReject("wrong_type", f"key {key!r}: expected a list, got {type(items).__name__}")
    system, turns = "", []
    for i, m in enumerate(items):
        if not isinstance(m, dict):
            raise RowReject("wrong_type", f"{key}[{i}]: expected an object")
        role = m.get(role_key)
        if role not in ROLE_ALIASES:
            raise RowReject("bad_conversation", f"{key}[{i}].{role_key}: unknown role {role!r}")
        try:
            text = _text(m, text_key)
        except RowReject as rej:  # say which turn, not just "value"
            raise RowReject(rej.reason, f"{key}[{i}]: {rej.detail}") from None
        if ROLE_ALIASES[role] == "system":
            system = text
        else:
            turns.append([ROLE_ALIASES[role], text])
    if not turns or turns[-1][0] != "Assistant" or not any(r == "User" for r, _ in turns):
        raise RowReject("bad_conversation", f"key {key!r}: needs a User turn and must end with an Assistant turn")
    return system, turns


def render_chat_prompt(system: str, turns) -> str:
    """Flatten chat turns into an SFT prompt (used when chat rows feed task=sft or a DPO prompt)."""
    lines = [system] if system else []
    lines += [f"{role}: {text}" for role, text in turns]
    return "\n".join(lines + ["Assistant:"])


def _response(value, key: str) -> Tuple[str, Optional[tuple]]:
    """A preference response: a string, or chat messages whose last turn is the assistant's.
    Returns (response text, (system, prompt turns) carried by the messages or None)."""
    if isinstance(value, list):
        system, turns = _turns(value, key, "role", "content")
        return " " + turns[-1][1].lstrip(), ((system, turns[:-1]) if len(turns) > 1 else None)
    return _text({key: value}, key), None


def _same_conversation(a: tuple, b: tuple) -> bool:
    """(system, turns) pairs equal up to whitespace and case."""
    def key(conv):
        system, turns = conv
        return dedup_text(system), [(role, dedup_text(text)) for role, text in turns]
    return key(a) == key(b)


def _pref_prompt(o: dict, prefixes: dict) -> Tuple[str, Optional[tuple]]:
    """The one prompt of a preference row. Responses given as messages carry their own prompt
    turns (TRL/UltraFeedback style); a row whose chosen and rejected (or explicit prompt) disagree
    on what was asked is rejected: its preference is not about one prompt.
    Returns (the prompt rendered plain, its (system, turns) when it is a conversation)."""
    carried = [(k, p) for k, p in prefixes.items() if p is not None]
    for (k1, p1), (k2, p2) in zip(carried, carried[1:]):
        if not _same_conversation(p1, p2):
            raise RowReject("dpo_prompt_mismatch", f"{k1!r} and {k2!r} continue different conversations")
    if "prompt" in o and isinstance(o["prompt"], list):
        system, turns = _turns(o["prompt"] + [{"role": "assistant", "content": "x"}], "prompt", "role", "content")
        explicit = (system, turns[:-1])
        if carried and not _same_conversation(carried[0][1], explicit):
            raise RowReject("dpo_prompt_mismatch", f"'prompt' and the turns before {carried[0][0]!r}'s answer differ")
        return render_chat_prompt(*explicit), explicit
    if "prompt" in o:
        prompt = _text(o, "prompt")
        if carried:
            system, turns = carried[0][1]
            # a plain prompt names the last user turn (or the whole rendered prefix)
            last_user = [dedup_text(t) for r, t in turns if r == "User"][-1:]
            if dedup_text(prompt) not in set(last_user) | {dedup_text(render_chat_prompt(system, turns))}:
                raise RowReject("dpo_prompt_mismatch",
                                f"'prompt' is not the last user turn before {carried[0][0]!r}'s answer")
        return prompt, None
    if carried:
        return render_chat_prompt(*carried[0][1]), carried[0][1]
    raise RowReject("missing_key", "key 'prompt' is missing")


def to_canonical(obj: dict, fmt: str) -> dict:
    kind, _, _ = FORMATS[fmt]
    o = _aliased(obj, fmt)
    if fmt == "nemo_sft":
        return {"input": _text(o, "input"), "output": _text(o, "output")}
    if fmt == "prompt_completion":
        return {"input": _text(o, "prompt"), "output": _text(o, "completion")}
    if fmt == "alpaca":
        extra = _text(o, "input", required=False)
        instruction = _text(o, "instruction")
        prompt = f"{instruction}\n{extra}" if extra.strip() else instruction
        return {"input": prompt, "output": _text(o, "output")}
    if fmt == "openai":
        if "messages" not in o:
            raise RowReject("missing_key", "key 'messages' is missing")
        system, turns = _turns(o["messages"], "messages", "role", "content")
        return {"system": system, "turns": turns}
    if fmt == "sharegpt":
        if "conversations" not in o:
            raise RowReject("missing_key", "key 'conversations' is missing")
        system, turns = _turns(o["conversations"], "conversations", "from", "value")
        return {"system": _text(o, "system", required=False) or system, "turns": turns}
    # preference
    ck, rk = ("chosen_response", "rejected_response") if fmt == "aligner_dpo" else ("chosen", "rejected")
    for k in (ck, rk):
        if k not in o:
            raise RowReject("missing_key", f"key {k!r} is missing")
    chosen, p1 = _response(o[ck], ck)
    rejected, p2 = _response(o[rk], rk)
    prompt, context = _pref_prompt(o, {ck: p1, rk: p2})
    if dedup_text(chosen) == dedup_text(rejected):
        raise RowReject("chosen_equals_rejected", "chosen and rejected responses are the same text")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "context": context}


def kind_of(fmt: str) -> str:
    return FORMATS[fmt][0]


# NeMo's chat markup (GPTSFTChatDataset's default special tokens), as NeMo-Aligner's DPO guide
# writes prompts for models SFT-trained on it: prompt up to "<extra_id_1>Assistant\n", each response
# followed by "\n<extra_id_1>".
NEMO_SYSTEM = CHAT_TOKENS["system_turn_start"] + CHAT_SYSTEM + CHAT_TOKENS["end_of_name"]
NEMO_TURN, NEMO_NAME_END, NEMO_END = CHAT_TOKENS["turn_start"], CHAT_TOKENS["end_of_name"], CHAT_TOKENS["end_of_turn"]
DPO_PROMPT_FORMATS = ("plain", "nemo_chat")


def render_nemo_chat_prompt(system: str, turns) -> str:
    """The text GPTSFTChatDataset builds for these turns, then the Assistant's header."""
    text = NEMO_SYSTEM + system + NEMO_END
    for role, value in turns:
        text += NEMO_TURN + role + NEMO_NAME_END + value + NEMO_END
    return text + NEMO_TURN + "Assistant" + NEMO_NAME_END


def _dpo_row(ex: dict, prompt_format: str) -> dict:
    if prompt_format == "plain":
        return {"prompt": ex["prompt"], "chosen_response": ex["chosen"], "rejected_response": ex["rejected"]}
    if ex.get("context") is not None:
        prompt = render_nemo_chat_prompt(*ex["context"])
    elif ex["prompt"].startswith(NEMO_SYSTEM):  # already in NeMo's markup
        prompt = ex["prompt"]
    else:
        prompt = render_nemo_chat_prompt("", [["User", ex["prompt"]]])
    end = NEMO_END + NEMO_TURN

    def response(r):
        r = r.lstrip()
        return r if r.endswith(end) else r + end
    return {"prompt": prompt, "chosen_response": response(ex["chosen"]), "rejected_response": response(ex["rejected"])}


def for_task(ex: dict, kind: str, task: str, dpo_prompt_format: str = "plain") -> dict:
    """The row as the chosen task's NeMo reader wants it (keys are NeMo's / Aligner's)."""
    if task == "rlhf":  # a prompt and its reference answer: rendered by the tokenizer-aware rlhf_prompt
        if kind == "pref":
            return {"prompt": ex["prompt"], "reference": ex["chosen"]}
        return for_task(ex, kind, "sft")
    if task == "sft":
        if kind == "chat":
            return {"input": render_chat_prompt(ex["system"], ex["turns"][:-1]),
                    "output": " " + ex["turns"][-1][1].lstrip()}
        return {"input": ex["input"], "output": ex["output"]}
    if task == "chat":
        if kind == "sft":
            system, turns = "", [["User", ex["input"]], ["Assistant", ex["output"].lstrip()]]
        else:
            system, turns = ex["system"], ex["turns"]
        return {"system": system, "conversations": [{"from": r, "value": t} for r, t in turns],
                "mask": "User", "type": None}
    if task == "rm":  # NeMo-Aligner's reward-model JSONL: the pair as two lines, chosen first
        return {"chosen": {"text": ex["prompt"] + ex["chosen"]}, "rejected": {"text": ex["prompt"] + ex["rejected"]}}
    return _dpo_row(ex, dpo_prompt_format)


def identity_fields(ex: dict, kind: str):
    """The text that makes two examples 'the same' (dedup key, split hash, near-dup shingles)."""
    if kind == "sft":
        return (ex["input"], ex["output"])
    if kind == "chat":
        return (ex["system"],) + tuple(t for _, t in ex["turns"])
    return (ex["prompt"], ex["chosen"], ex["rejected"])
