"""Class-name ranking: the log-likelihood of every class name after a few-shot prompt (the reference's
`get_rank_classifications`), with the prompt run once and its KV cache reused for all class names.

Per query batch: the images are encoded once; the prompt (B, L) runs once with `use_cache=True`, which gives the
first class token's log-probability (the last prompt position) and the cache; the class names then run in chunks of
`rows` (query, class) rows, each row's cache the query's, repeated. A class name's score is the mean (the
reference's `normalize_length=True`) of its tokens' log-probabilities. Every class token attends to the query's
image, the last one of its prompt (as `Flamingo.generate` does for incremental steps: its latents alone are passed),
and to the prompt's real tokens only (its left padding stays masked). Positions continue from
the padded prompt length, as in a plain forward over prompt + class name: the cached and the uncached paths score
the same numbers.

`use_cache=False` is the reference's slow path (`--no_caching_for_classification`): prompt + class name run
together for every (query, class) row (the images are still encoded once).

Memory per query batch of B queries, prompt length L, class names of at most n tokens, R rows per call: the prompt
cache (B x L) and the expanded cache (R x (L + n)), each `cache_bytes_per_token` (2 x layers x hidden x bytes per
value), plus the rows' logits (R x n x vocab, float32). `memory_per_query_batch` gives the figure (README).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from flamingo_composer.models.cross_attention import media_text_time
from flamingo_composer.models.lm_adapter import MediaConditioning, no_cache


def class_token_ids(tokenizer, class_names: Sequence[str]) -> list[list[int]]:
    """Each class name's tokens, tokenised alone without special tokens (as the reference does)."""
    tokens = [tokenizer(name, add_special_tokens=False)["input_ids"] for name in class_names]
    empty = [name for name, ids in zip(class_names, tokens) if not ids]
    if empty:
        raise ValueError(f"class names that tokenise to nothing: {empty[:5]}")
    return tokens


def _expand_cache(cache, repeats: int):
    """The prompt's KV cache with every row repeated `repeats` times (row b -> rows b*repeats .. +repeats-1).

    Legacy tuples (MPT) and DynamicCache are rebuilt from repeated tensors (the prompt cache stays untouched, so it
    serves every chunk); other Cache classes are copied and expanded by their own `batch_repeat_interleave`."""
    if isinstance(cache, tuple | list):
        return tuple(_expand_cache(part, repeats) if isinstance(part, tuple | list) else
                     part.repeat_interleave(repeats, dim=0) for part in cache)  # fmt: skip
    if hasattr(cache, "to_legacy_cache") and hasattr(type(cache), "from_legacy_cache"):
        return type(cache).from_legacy_cache(_expand_cache(cache.to_legacy_cache(), repeats))
    if hasattr(cache, "batch_repeat_interleave"):
        expanded = copy.deepcopy(cache)
        expanded.batch_repeat_interleave(repeats)
        return expanded
    raise ValueError(f"cannot reuse a {type(cache).__name__} for class names: set kv_cache: false")


def _last_logits_only(lm) -> dict:
    """`logits_to_keep=1` when the LM's forward takes it (the prompt pass needs the last position only)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(lm.forward).parameters else {}


def _chunks(class_tokens: Sequence[Sequence[int]], per_chunk: int) -> list[list[int]]:
    """Class indices in chunks of `per_chunk`, by token count (less padding), each chunk in index order."""
    order = sorted(range(len(class_tokens)), key=lambda c: (len(class_tokens[c]), c))
    return [sorted(order[i : i + per_chunk]) for i in range(0, len(order), per_chunk)]


def _padded(class_tokens: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (c, n) and their mask (c, n)."""
    n = max(len(t) for t in class_tokens)
    ids = torch.full((len(class_tokens), n), pad_id, dtype=torch.long)
    mask = torch.zeros(len(class_tokens), n, dtype=torch.long)
    for i, tokens in enumerate(class_tokens):
        ids[i, : len(tokens)] = torch.tensor(tokens)
        mask[i, : len(tokens)] = 1
    return ids, mask


@torch.no_grad()
def class_log_likelihoods(
    model,
    *,
    images: torch.Tensor,
    image_mask: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    class_tokens: Sequence[Sequence[int]],
    use_cache: bool = True,
    rows: int = 64,
    normalize_length: bool = True,
) -> torch.Tensor:
    """(B, C) float32 on CPU: each class name's mean (or summed) token log-probability after each prompt.

    model: our Flamingo (eval mode); images (N, 3, H, W) with image_mask (B, T_img); input_ids / attention_mask
    (B, L), left-padded.
    """
    lm = model.lang_encoder
    if use_cache and not no_cache(lm):
        raise ValueError(f"{type(lm).__name__} takes no use_cache: classify with kv_cache: false")
    device = input_ids.device
    b, length = input_ids.shape
    media = model.encode_media(images, image_mask)  # (B, T_img, n_lat, D)
    prompt_time = media_text_time(input_ids, model.media_token_id)  # (B, L)
    query_image = prompt_time[:, -1]  # (B,): class tokens attend to the prompt's last image
    pad_id = model.special_token_ids["pad"]
    scores = torch.empty(b, len(class_tokens), dtype=torch.float32)

    if use_cache:
        with model.media_context.activate(MediaConditioning(media=media, text_time=prompt_time)):
            out = lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, **_last_logits_only(lm))
        first_logprobs = F.log_softmax(out.logits[:, -1].float(), dim=-1)  # (B, V)
        prompt_cache = out.past_key_values
        del out

        # Class tokens see only the query's image: its latents alone (one slot, image number 1, or none) give the
        # same attention as all T_img slots behind the mask, without the cross-attention's keys and values of the
        # demos' images for every (query, class) row.
        query_media = media[torch.arange(b, device=media.device), (query_image - 1).clamp(min=0)][:, None]
        query_time = (query_image > 0).long()  # (B,): 1 = the query's image, 0 = no image before the class name

    for chunk in _chunks(class_tokens, max(1, rows // b)):
        c = len(chunk)
        ids, mask = _padded([class_tokens[i] for i in chunk], pad_id)  # (c, n)
        ids, mask = ids.to(device).repeat(b, 1), mask.to(device).repeat(b, 1)  # (B*c, n): row = query * c + class
        n = ids.shape[1]
        row_mask = torch.cat([attention_mask.repeat_interleave(c, dim=0), mask.to(attention_mask.dtype)], dim=1)
        if use_cache:
            row_media = query_media.repeat_interleave(c, dim=0)  # (B*c, 1, n_lat, D)
            text_time = query_time.repeat_interleave(c)[:, None].expand(-1, n)  # (B*c, n)
            with model.media_context.activate(MediaConditioning(media=row_media, text_time=text_time)):
                logits = lm(input_ids=ids, attention_mask=row_mask, past_key_values=_expand_cache(prompt_cache, c),
                            use_cache=True).logits  # (B*c, n, V)  # fmt: skip
            first = first_logprobs.repeat_interleave(c, dim=0).gather(1, ids[:, :1])  # (B*c, 1)
            rest = F.log_softmax(logits[:, :-1].float(), dim=-1).gather(2, ids[:, 1:, None])[..., 0]  # (B*c, n-1)
            token_logprobs = torch.cat([first, rest], dim=1)  # (B*c, n)
        else:
            row_media = media.repeat_interleave(c, dim=0)  # (B*c, T_img, n_lat, D)
            full_ids = torch.cat([input_ids.repeat_interleave(c, dim=0), ids], dim=1)  # (B*c, L+n)
            text_time = media_text_time(full_ids, model.media_token_id)  # (B*c, L+n)
            with model.media_context.activate(MediaConditioning(media=row_media, text_time=text_time)):
                logits = lm(input_ids=full_ids, attention_mask=row_mask, **no_cache(lm)).logits  # (B*c, L+n, V)
            predicting = logits[:, length - 1 : length + n - 1].float()  # (B*c, n, V): position t predicts t+1
            token_logprobs = F.log_softmax(predicting, dim=-1).gather(2, ids[..., None])[..., 0]  # (B*c, n)
        valid = mask.to(token_logprobs.dtype)  # (B*c, n)
        summed = (token_logprobs * valid).sum(1)  # (B*c,)
        per_row = summed / valid.sum(1) if normalize_length else summed
        scores[:, chunk] = per_row.view(b, c).float().cpu()
    return scores


def cache_bytes_per_token(*, layers: int, kv_width: int, bytes_per_value: int) -> int:
    """Bytes of KV cache one token holds across the LM (keys and values of every layer)."""
    return 2 * layers * kv_width * bytes_per_value


def memory_per_query_batch(*, queries: int, prompt_tokens: int, class_tokens: int, rows: int, layers: int,
                           kv_width: int, vocab: int, bytes_per_value: int) -> dict[str, int]:  # fmt: skip
    """The cached path's peak tensors for one query batch, in bytes (see the module docstring)."""
    per_token = cache_bytes_per_token(layers=layers, kv_width=kv_width, bytes_per_value=bytes_per_value)
    sizes = {
        "prompt_cache": queries * prompt_tokens * per_token,
        "expanded_cache": rows * (prompt_tokens + class_tokens) * per_token,
        "class_logits": rows * class_tokens * vocab * 4,
    }
    sizes["total"] = sum(sizes.values())
    return sizes
