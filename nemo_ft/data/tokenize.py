"""Tokenizer and prompt template, reproducing NeMo's GPTSFTDataset token for token.

NeMo's `_process_example` strips spaces from each value, splits the prompt template around its
placeholders, tokenizes every piece on its own and concatenates (context, then label, then EOS).
We do exactly the same here so that (a) the length we check is the length NeMo will see and
(b) our packed .npy holds the ids NeMo would have produced (tests/test_prep_nemo.py checks it).
"""
import json
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from nemo_ft.artifacts import sha256_file
from nemo_ft.data.errors import RowReject
from nemo_ft.errors import ConfigError


class Tokenizer:
    """SentencePiece model file, or a local Hugging Face tokenizer directory (tokenizer.json)."""

    def __init__(self, library: str, model: str):
        self.library, self.model = library, model
        if not model or not os.path.exists(model):
            raise ConfigError("tokenizer.model", f"no such file or directory: {model!r}")
        if library == "sentencepiece":
            import sentencepiece
            self.sp = sentencepiece.SentencePieceProcessor(model_file=model)
            self.vocab_size = self.sp.get_piece_size()
            self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()
            self.sha256 = sha256_file(model)
        elif library == "huggingface":
            # prep already runs one process per core; the Rust thread pool would only fight them
            # (and warns in every forked worker once the parent has encoded anything).
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            from tokenizers import Tokenizer as HFTokenizer
            path = os.path.join(model, "tokenizer.json") if os.path.isdir(model) else model
            if not os.path.exists(path):
                raise ConfigError("tokenizer.model", f"no tokenizer.json at {path!r}")
            self.hf = HFTokenizer.from_file(path)
            self.vocab_size = self.hf.get_vocab_size()
            # What transformers' save_pretrained writes; AutoTokenizer (NeMo's HF path) reads the same.
            special = {}
            for name in ("special_tokens_map.json", "tokenizer_config.json"):
                cfg = os.path.join(os.path.dirname(path), name)
                if os.path.exists(cfg):
                    with open(cfg) as f:
                        special.update({k: v for k, v in json.load(f).items() if v is not None})
            self.special_ids = {i for i, t in self.hf.get_added_tokens_decoder().items() if t.special}
            def tok_id(name):
                tok = special.get(name)
                tok = tok.get("content") if isinstance(tok, dict) else tok
                i = self.hf.token_to_id(tok) if tok else None
                return -1 if i is None else i
            self.bos_id, self.eos_id, self.pad_id = tok_id("bos_token"), tok_id("eos_token"), tok_id("pad_token")
            self.sha256 = sha256_file(path)
        else:
            raise ConfigError("tokenizer.library", f"expected 'sentencepiece' or 'huggingface', got {library!r}")
        # NeMo's own probe: does tokenizing 'x y' in one go differ from 'x' + 'y'?
        self.space_sensitive = self.encode("x y") != self.encode("x") + self.encode("y")

    def encode(self, text: str) -> List[int]:
        if self.library == "sentencepiece":
            return self.sp.encode_as_ids(text)
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: List[int]) -> str:
        if self.library == "sentencepiece":
            return self.sp.decode_ids(ids)
        return self.hf.decode(ids)

    def is_special(self, i: int) -> bool:
        if self.library == "sentencepiece":
            return self.sp.is_control(i)
        return i in self.special_ids

    def info(self) -> dict:
        return {"library": self.library, "model": self.model, "sha256": self.sha256,
                "vocab_size": self.vocab_size, "bos_id": self.bos_id, "eos_id": self.eos_id,
                "pad_id": self.pad_id, "space_sensitive": self.space_sensitive}


@dataclass
class Template:
    prompt_template: str = "{input} {output}"
    label_key: str = "output"
    truncation_field: Optional[str] = "input"
    truncation_method: str = "right"
    add_bos: bool = False
    add_eos: bool = True

    def __post_init__(self):
        # NeMo unescapes the template (so "\n" typed on a command line becomes a newline).
        self.resolved = self.prompt_template.encode("utf-8").decode("unicode_escape")
        self.keys = re.findall(r"{(.*?)}", self.resolved)
        label = "{" + self.label_key + "}"
        if not self.resolved.endswith(label):
            raise ConfigError("template.prompt_template",
                              f"{self.prompt_template!r} must end with {label} (NeMo requires the label "
                              f"placeholder last, so the loss mask covers only the response)")
        if self.keys.count(self.label_key) != 1:
            raise ConfigError("template.prompt_template", f"{label} must appear exactly once")
        if self.truncation_field and self.truncation_field not in self.keys:
            raise ConfigError("template.truncation_field",
                              f"{self.truncation_field!r} is not a placeholder of {self.prompt_template!r} "
                              f"(placeholders: {self.keys})")
        if self.truncation_field == self.label_key:
            raise ConfigError("template.truncation_field", "truncating the label would train on a cut response")
        if self.truncation_method not in ("left", "right"):
            raise ConfigError("template.truncation_method", f"expected left or right, got {self.truncation_method!r}")
        parts = [p for p in re.split("( *?{.+?})", self.resolved) if p]
        self.parts = parts

    def check_keys(self, sft_keys=("input", "output")):
        unknown = [k for k in self.keys if k not in sft_keys]
        if unknown:
            raise ConfigError("template.prompt_template",
                              f"placeholders {unknown} are not keys of the SFT rows prep writes {list(sft_keys)}")

    def pieces(self, values: Dict[str, str], space_sensitive: bool) -> Tuple[List[str], List[str]]:
        """NeMo's `_separate_template`: strings to tokenize one by one, and the key of each."""
        strings, keys = [], []
        for t in self.parts:
            if not space_sensitive and t[0] == " ":
                t = t[1:]
            ph = t.lstrip(" ")
            spaces = " " * (len(t) - len(ph))
            if ph.startswith("{") and ph.endswith("}") and ph[1:-1] in values:
                strings.append(spaces + values[ph[1:-1]].strip(" "))
                keys.append(ph[1:-1])
            else:
                strings.append(spaces + ph)
                keys.append("<template>")
        return strings, keys


def encode_sft(tok: Tokenizer, tpl: Template, ex: Dict[str, str]) -> Tuple[List[int], int, List[List[int]], List[str]]:
    """(input_ids, answer_start_idx, per-piece ids, piece keys) exactly as NeMo builds them."""
    strings, keys = tpl.pieces(ex, tok.space_sensitive)
    piece_ids = [tok.encode(s) for s in strings]
    context = [i for ids in piece_ids[:-1] for i in ids]
    if tpl.add_bos:
        context = [tok.bos_id] + context
    ids = context + piece_ids[-1]
    if tpl.add_eos:
        ids = ids + [tok.eos_id]
    return ids, len(context), piece_ids, keys


def rlhf_prompt(tok: Tokenizer, tpl: Template, row: Dict[str, str], seq_length: int) -> Tuple[Dict[str, str], int]:
    """({"text": prompt, "reference": answer}, prompt tokens) for NeMo-Aligner's RLHF prompt dataset.

    An SFT row's prompt is the template rendered up to the label, and it must encode to exactly the
    context tokens SFT trained on (NeMo tokenizes the template's pieces one by one; Aligner encodes the
    prompt text whole): otherwise the policy would be asked to continue a prompt it never saw. The
    reference is the label's text as SFT rendered it. Aligner's RLHFDataset silently skips prompts
    longer than seq_length // 2 (it moves on to the next row): rejected here instead."""
    if "reference" in row:  # preference rows: the prompt as given, the chosen response as the reference
        text, reference = row["prompt"], row["reference"]
        ids = tok.encode(text)
    else:
        strings, _ = tpl.pieces(row, tok.space_sensitive)
        context = [i for s in strings[:-1] for i in tok.encode(s)]
        text, reference = "".join(strings[:-1]), strings[-1]
        ids = tok.encode(text)
        if ids != context:
            raise RowReject("rlhf_prompt_not_sft_context", "the prompt text encodes to other tokens than SFT's "
                                                           "template pieces do (a merge across a piece boundary)")
    if len(ids) > seq_length // 2:
        raise RowReject("rlhf_prompt_too_long", f"{len(ids)} prompt tokens > seq_length // 2 = {seq_length // 2} "
                                                "(Aligner's RLHF dataset would skip the row silently)")
    return {"text": text, "reference": reference}, len(ids)


def fit_sft(tok: Tokenizer, tpl: Template, ex: Dict[str, str], seq_length: int, truncate: bool):
    """Encode `ex`; if longer than seq_length, cut `truncation_field` or return None (reject).

    Returns (example, ids, answer_start, truncated). The cut is done in tokens, decoded back to
    text (that is what the SFT stage will re-tokenize) and re-encoded until it fits, because a
    decode/encode round trip may merge pieces differently at the cut.
    """
    ids, start, piece_ids, keys = encode_sft(tok, tpl, ex)
    if len(ids) <= seq_length:
        return ex, ids, start, False
    if not truncate or not tpl.truncation_field:
        return None
    field = tpl.truncation_field
    field_ids = [p for p, k in zip(piece_ids, keys) if k == field][0]
    excess = len(ids) - seq_length
    for _ in range(4):
        keep = len(field_ids) - excess
        if keep <= 0:
            return None
        kept = field_ids[:keep] if tpl.truncation_method == "right" else field_ids[-keep:]
        cut = dict(ex)
        cut[field] = tok.decode(kept)
        if not cut[field].strip():
            return None
        ids, start, _, _ = encode_sft(tok, tpl, cut)
        if len(ids) <= seq_length:
            return cut, ids, start, True
        excess += len(ids) - seq_length
    return None


def _dpo_encode(tok: Tokenizer, prompt_ids: List[int], prompt: str, response: str, append_eod: bool):
    """(length, prefix holds) of prompt+response exactly as NeMo-Aligner 0.7.0's
    DPOModelDataset.__getitem__ (nemo_aligner/data/nlp/datasets.py) builds it for a string prompt:
    `encode(prompt)`, `encode(prompt + response)` as one string (+ EOS if model.data.append_eod),
    then drops the last token (`chosen = chosen[:-1]`, `chosen_len -= 1`) and asserts
    `chosen[0:prompt_len] == prompt` ("the tokenizer for DPO has merged tokens between prompt and
    response"); `max(chosen_len, reject_len) > seq_length` keeps the row with zero loss.
    """
    ids = tok.encode(prompt + response)
    if ids and append_eod:
        ids.append(tok.eos_id)
    ids = ids[:-1]
    return len(ids), ids[:len(prompt_ids)] == prompt_ids


def dpo_pair_length(tok: Tokenizer, row: Dict[str, str], append_eod: bool = False) -> int:
    """The length NeMo-Aligner's DPOModelDataset compares with seq_length: the longer of prompt+chosen
    and prompt+rejected, as it builds them (see _dpo_encode)."""
    prompt_ids = tok.encode(row["prompt"])
    return max(_dpo_encode(tok, prompt_ids, row["prompt"], row[k], append_eod)[0]
               for k in ("chosen_response", "rejected_response"))


def fit_dpo(tok: Tokenizer, row: Dict[str, str], seq_length: int, truncate: bool, fix: bool,
            append_eod: bool = False):
    """Check an Aligner DPO row {prompt, chosen_response, rejected_response} the way Aligner will.

    Returns (row, length, truncated, fixed); raises RowReject where Aligner would crash (prompt
    not a token prefix) or silently train on nothing (over length). `fix` prepends one space to a
    response whose first characters merge with the prompt's last token (the usual SentencePiece
    case). `truncate` drops whole words from the *start of the prompt*: the responses are what is
    compared and cannot be cut, and the prompt's end holds the turn marker they continue. The cut
    is made in the original text (not by decoding tokens), so newlines and spacing survive.
    """
    def check(row):
        prompt_ids = tok.encode(row["prompt"])
        row, fixed, lengths = dict(row), False, []
        for key in ("chosen_response", "rejected_response"):
            n, ok = _dpo_encode(tok, prompt_ids, row["prompt"], row[key], append_eod)
            if not ok and fix:
                n2, ok = _dpo_encode(tok, prompt_ids, row["prompt"], " " + row[key], append_eod)
                if ok:
                    row[key], n, fixed = " " + row[key], n2, True
            if not ok:
                raise RowReject("dpo_prompt_not_token_prefix",
                                f"{key}: tokens of prompt+response do not start with the prompt's tokens "
                                f"(NeMo-Aligner's DPO dataset asserts this)"
                                + ("; a leading space does not fix it" if fix else
                                   "; start the response with a space or set dpo.prefix_mismatch=fix"))
            lengths.append(n)
        return row, max(lengths), fixed

    checked, n, fixed = check(row)
    if n <= seq_length:
        return checked, n, False, fixed
    too_long = f"prompt+longest response = {n} tokens > seq_length={seq_length} (Aligner keeps it with zero loss)"
    if not truncate:
        raise RowReject("dpo_over_length", too_long)
    prompt = row["prompt"]
    # word starts after the first one, latest last: the shortest suffix that fits keeps the most.
    cuts = [i for i in range(1, len(prompt)) if prompt[i - 1].isspace() and not prompt[i].isspace()]
    longest = max(len(row["chosen_response"]), len(row["rejected_response"]))
    fits = lambda i: max(_dpo_encode(tok, [], prompt[i:], row[k], append_eod)[0]
                         for k in ("chosen_response", "rejected_response")) <= seq_length
    lo, hi = 0, len(cuts)  # binary search for the first cut that fits (length falls as the cut moves right)
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(cuts[mid]):
            hi = mid
        else:
            lo = mid + 1
    if lo == len(cuts) or longest == 0:
        raise RowReject("dpo_over_length", too_long + "; cutting the prompt cannot absorb the excess")
    checked, n, fixed = check({**row, "prompt": prompt[cuts[lo]:]})
    if n > seq_length:  # a leading space added by the fix can tip it over
        raise RowReject("dpo_over_length", too_long + "; cutting the prompt cannot absorb the excess")
    return checked, n, True, fixed


# NeMo's GPTSFTChatDataset defaults (gpt_sft_dataset.py, used when model.data.chat_prompt_tokens is
# unset) and the constants of gpt_sft_chat_dataset.py; copied, because data/ must not import NeMo.
CHAT_TOKENS = {"system_turn_start": "<extra_id_0>", "turn_start": "<extra_id_1>", "label_start": "<extra_id_2>",
               "end_of_turn": "\n", "end_of_name": "\n"}
CHAT_SYSTEM = "System"
CHAT_PREFIX = "\x00"  # NeMo's PREFIX_STR: tokenized in front of a turn, then cut, to drop a leading "▁"


def _after_prefix(tok: Tokenizer, text: str) -> int:
    """NeMo's length of `text` tokenized mid-sequence: len(ids(PREFIX + text)) - len(ids(PREFIX))."""
    return len(tok.encode(CHAT_PREFIX + text)) - len(tok.encode(CHAT_PREFIX))


def encode_chat(tok: Tokenizer, row: dict, special: Dict[str, str] = CHAT_TOKENS) -> Tuple[List[int], List[bool]]:
    """(input_ids, loss mask) of one NeMo chat row {system, conversations, mask, type: null},
    exactly as NeMo 2.4's GPTSFTChatDataset `preprocess` builds them (gpt_sft_chat_dataset.py).

    The whole conversation is rendered to one string and tokenized in one go (no BOS, no EOS:
    add_bos/add_eos do not apply to chat), so len(input_ids) is the length NeMo sees; collate_fn
    then trains on input_ids[:-1] with loss_mask = mask[1:], and mask[0] (the header) is always 0.
    The mask is placed the way NeMo places it, by per-turn token counts rather than by where the
    turns really fall in the joint tokenization, so it agrees with NeMo's even where the two differ.
    What it trains on with mask="User": each Assistant turn's text and end-of-turn, the turn-start
    marker that follows it (the next User turn's, or one appended after a final Assistant turn),
    never the system header, the first turn, or anything of a User turn but that marker.
    Raises RowReject where NeMo would crash (its header-is-a-token-prefix assertion).
    """
    if row.get("type") is not None:
        raise ValueError(f"only type=null chat rows are rendered here, got {row.get('type')!r}")
    turn, eot, eon = special["turn_start"], special["end_of_turn"], special["end_of_name"]
    mask_role = row.get("mask", "User")
    header = f"{special['system_turn_start']}{CHAT_SYSTEM}{eon}{row['system']}{eot}"
    turns = [(t["from"], f"{turn}{t['from']}{eon}{t['value']}{eot}") for t in row["conversations"]]
    conversation = header + "".join(v for _, v in turns)
    # NeMo tests `speaker in mask_role` on the string, a substring test; kept as is.
    if turns and turns[-1][0] not in mask_role:
        conversation += turn  # the model learns to hand the turn back
    ids, header_ids = tok.encode(conversation), tok.encode(header)
    header_len = len(header_ids)
    if ids[:header_len] != header_ids:  # e.g. a BPE merge across the header's last newline
        raise RowReject("chat_header_not_token_prefix",
                        "the system header's tokens are not a prefix of the conversation's "
                        "(NeMo's GPTSFTChatDataset asserts this)")
    mask = [False] * header_len + [True] * (len(ids) - header_len)
    n_turn_start = _after_prefix(tok, turn)
    cur = header_len
    for i, (speaker, value) in enumerate(turns):
        n = _after_prefix(tok, value)
        if cur >= len(ids):
            break
        if i == 0:
            lo, hi = cur, cur + n  # the first turn is context, whoever speaks it
        elif speaker in mask_role:
            lo, hi = (cur + n_turn_start if i > 1 else cur), cur + n
        else:
            lo, hi = cur, cur + _after_prefix(tok, f"{turn}{speaker}{eon}")  # the name part only
        hi = min(hi, len(ids))
        mask[lo:hi] = [False] * max(0, hi - lo)
        cur += n
    return ids, mask


def check_template(tok: Tokenizer, tpl: Template) -> None:
    """Template/tokenizer agreement, before any row is read (a config error, not a reject)."""
    if tpl.add_eos and not (0 <= tok.eos_id < tok.vocab_size and tok.is_special(tok.eos_id)):
        raise ConfigError("template.add_eos", f"tokenizer {tok.model} defines no EOS token (eos_id={tok.eos_id})")
    if tpl.add_bos and not (0 <= tok.bos_id < tok.vocab_size and tok.is_special(tok.bos_id)):
        raise ConfigError("template.add_bos", f"tokenizer {tok.model} defines no BOS token (bos_id={tok.bos_id})")
    probe = {k: f"probe {k}" for k in tpl.keys}
    ids, start, pieces, _ = encode_sft(tok, tpl, probe)
    answer = pieces[-1]
    if not answer or ids[start:start + len(answer)] != answer or start == 0 and len(tpl.keys) > 1:
        raise ConfigError("template.prompt_template", "the rendered template does not end with the response tokens")
