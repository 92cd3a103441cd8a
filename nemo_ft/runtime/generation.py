"""Greedy generation through NeMo's own path (megatron text_generation_utils.generate with its KV cache),
the one eval, export's checks and the Triton server use; and the no-cache loop it is tested against.

On a CPU NeMo's generate needs the CPU_PATCHES of patches.py (torch.cuda.FloatTensor, ByteTensor) and
two choices made here: the strategy is passed explicitly (NeMo's dispatcher imports the multimodal
NeVA model, which fails without torchvision), and `MegatronGPTModel.generate` is not used (it calls
Lightning's `.cuda()`, which builds torch.device("cuda", ...)). Facts: ../shared/NEMO_CPU.md.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Generation:
    prompt_ids: list
    ids: list          # the generated tokens, EOS excluded
    text: str
    ended_with_eos: bool


def greedy(model, prompts: list, max_new_tokens: int) -> list[Generation]:
    """Greedy continuations of `prompts` (texts, or lists of token ids) with NeMo's generate + KV cache,
    stopping at EOS or after max_new_tokens. No BOS is added (as NeMo's SFT prompts have none)."""
    import torch
    from nemo.collections.nlp.modules.common.text_generation_strategy import GPTModelTextGenerationStrategy
    from nemo.collections.nlp.modules.common.text_generation_utils import generate

    tok = model.tokenizer
    prompt_ids = [list(p) if not isinstance(p, str) else tok.text_to_ids(p) for p in prompts]
    # NeMo's batch layout: prompts right-padded with EOS to the longest + room for the new tokens.
    width = max(len(p) for p in prompt_ids) + max_new_tokens
    tokens = torch.full((len(prompt_ids), width), tok.eos_id, dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        tokens[i, :len(p)] = torch.tensor(p)
    lengths = torch.tensor([len(p) for p in prompt_ids])
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = generate(model, inputs=(tokens, lengths), tokens_to_generate=max_new_tokens, greedy=True,
                       repetition_penalty=1.0, end_strings=[], min_tokens_to_generate=0, all_probs=False,
                       compute_logprob=False, strategy=GPTModelTextGenerationStrategy(model))
    model.train(was_training)
    return [_cut(p, list(map(int, ids)), tok, max_new_tokens) for p, ids in zip(prompt_ids, out["token_ids"])]


def greedy_no_cache(model, prompt_ids: list, max_new_tokens: int) -> Generation:
    """The reference: argmax over the full forward of the whole sequence at every step, no KV cache."""
    import torch

    tok = model.tokenizer
    seq = list(prompt_ids)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for _ in range(max_new_tokens):
            t = torch.tensor([seq])
            logits = model.model(t, torch.arange(len(seq))[None], None)
            nxt = int(logits[0, -1].float().argmax())
            seq.append(nxt)
            if nxt == tok.eos_id:
                break
    model.train(was_training)
    return _cut(list(prompt_ids), seq, tok, max_new_tokens)


def _cut(prompt: list, full: list, tok, max_new_tokens: int) -> Generation:
    new = full[len(prompt):len(prompt) + max_new_tokens]
    eos = tok.eos_id in new
    new = new[:new.index(tok.eos_id)] if eos else new
    return Generation(prompt_ids=prompt, ids=new, text=tok.ids_to_text(new) if new else "", ended_with_eos=eos)
