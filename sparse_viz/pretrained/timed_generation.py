"""Generation that times its prefill and its decode steps apart (what `generate` hides).

The loop is the plain one transformers' `generate` runs for greedy and sampling: a prefill with a
fresh `DynamicCache`, then one token per forward through it. Whatever attention the model has
installed (its own, or `sparse_inference`) runs in both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class TimedGeneration:
    """Tokens generated after a prompt, and where the time went.

    Attributes:
        token_ids: (N,) the new tokens (stopped at the end-of-sequence token if one came).
        prompt_tokens: tokens of the prompt.
        prefill_seconds: the forward over the whole prompt.
        decode_seconds: all decode steps together (the first new token comes from the prefill).
    """

    token_ids: list[int]
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("inf")

    @property
    def decode_tokens_per_second(self) -> float:
        steps = max(len(self.token_ids) - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds > 0 else float("inf")


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Greedy (temperature 0) or nucleus sampling from one row of logits (V,)."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    ordered, order = probs.sort(descending=True)
    keep = ordered.cumsum(0) - ordered < top_p  # the smallest prefix whose mass reaches top_p
    ordered = ordered * keep
    choice = torch.multinomial(ordered / ordered.sum(), 1, generator=generator)
    return int(order[choice])


@torch.no_grad()
def generate_timed(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                   top_p: float = 1.0, seed: int = 0, eos_token_id: int | None = None) -> TimedGeneration:
    """Generate up to `max_new_tokens` after `input_ids` (1, T), timing prefill and decode apart.

    Args:
        model: a Hugging Face causal LM (any installed attention).
        input_ids: (1, T) the prompt.
        max_new_tokens: >= 1.
        temperature: 0 = greedy; else sampling at this temperature.
        top_p: nucleus mass kept when sampling.
        seed: seed of the sampler.
        eos_token_id: stop after this token.

    Returns:
        `TimedGeneration`.
    """
    from transformers import DynamicCache

    generator = torch.Generator(device="cpu").manual_seed(seed) if temperature > 0 else None
    device = input_ids.device
    started = time.perf_counter()
    # The last position's logits only, as `generate` does: the prompt's others are never read.
    out = model(input_ids=input_ids, past_key_values=DynamicCache(config=model.config), use_cache=True,
                logits_to_keep=1)
    tokens = [next_token(out.logits[0, -1].cpu(), temperature, top_p, generator)]
    prefill = time.perf_counter() - started
    cache = out.past_key_values
    started = time.perf_counter()
    while len(tokens) < max_new_tokens and tokens[-1] != eos_token_id:
        step = torch.tensor([[tokens[-1]]], device=device)
        out = model(input_ids=step, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        tokens.append(next_token(out.logits[0, -1].cpu(), temperature, top_p, generator))
    return TimedGeneration(tokens, int(input_ids.shape[1]), prefill, time.perf_counter() - started)
