"""New-token embedding rows as their own trainable Parameter, spliced into a frozen embedding at look-up.

Only `<|endofchunk|>` and `<image>` are learned (SPEC 1, FIX): instead of a trainable (V, D) matrix with a
gradient mask, the frozen `weight` keeps every row exactly as loaded (the `<PAD>` row included) and
`new_token_rows` (2, D) replaces the rows of the new ids wherever they are looked up. Works under FSDP and
needs no hooks. The look-up keeps what the LM's own embedding module does: a plain row look-up, or one scaled by
its `embed_scale` (Gemma-3's sqrt(d)); `splice_new_token_rows` checks the result equals the original module's.
For LMs with tied input/output embeddings, `SplicedLMHead` projects with the same spliced matrix; LMs whose tied
logits are computed inside their own forward from the input embedding's `weight` (the remote code of the released
3B/9B LMs) get that one `F.linear` routed to the same projection (`TiedLogitsInForward`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from flamingo_composer.models.lm_adapter import ensure_input_embedding_accessors
from flamingo_composer.special_tokens import ENDOFCHUNK_TOKEN, MEDIA_TOKEN, PAD_TOKEN, SpecialTokens


class NewTokenRows(nn.Module):
    """The trainable new-token rows in a module of their own, so FSDP can give them a unit without frozen weights.

    Read them by calling the module (not through `.weight`): under FSDP only a call gathers the sharded rows;
    the clone keeps the result valid after FSDP frees the gathered copy.
    """

    def __init__(self, rows: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(rows)  # (K, D)

    def forward(self) -> torch.Tensor:
        return self.weight.clone()  # (K, D)


class SplicedEmbedding(nn.Module):
    """Embedding look-up over `weight` (V, D, frozen) with the rows of `new_token_ids` taken from `new_token_rows`,
    every row multiplied by `embed_scale` when the LM's embedding scales (in the weight's dtype, as Gemma-3 does)."""

    def __init__(self, weight: torch.Tensor, new_token_ids: list[int], embed_scale: torch.Tensor | None = None):
        super().__init__()
        vocab_size, dim = weight.shape
        for token_id in new_token_ids:
            if not 0 <= token_id < vocab_size:
                raise ValueError(f"new token id {token_id} outside the embedding's {vocab_size} rows")
        if len(set(new_token_ids)) != len(new_token_ids):
            raise ValueError(f"new token ids must be distinct, got {new_token_ids}")
        ids = torch.tensor(new_token_ids, dtype=torch.long, device=weight.device)
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)  # (V, D)
        # At least fp32 (an LM loaded in bf16 still trains fp32 rows; a float64 parity run keeps float64).
        rows = weight.detach()[ids].to(torch.promote_types(weight.dtype, torch.float32))  # (K, D)
        self.trainable_rows = NewTokenRows(rows)  # holds (K, D), K = len(new_token_ids)
        self.register_buffer("new_token_ids", ids, persistent=False)  # (K,)
        slot_of_id = torch.full((vocab_size,), -1, dtype=torch.long, device=weight.device)
        slot_of_id[ids] = torch.arange(len(new_token_ids), device=weight.device)
        self.register_buffer("slot_of_id", slot_of_id, persistent=False)  # (V,): row of new_token_rows or -1
        if embed_scale is not None:  # a buffer, so FSDP's meta-device ranks receive rank 0's value with the others
            self.register_buffer("embed_scale", torch.as_tensor(embed_scale).detach().clone(), persistent=False)
        else:
            self.embed_scale = None

    @property
    def new_token_rows(self) -> nn.Parameter:
        """The trainable (K, D) rows (a Parameter of the `trainable_rows` child)."""
        return self.trainable_rows.weight

    @property
    def num_embeddings(self) -> int:
        return self.weight.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.weight.shape[1]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (...,) -> (..., D)."""
        base = F.embedding(input_ids, self.weight)  # (..., D)
        slot = self.slot_of_id[input_ids]  # (...,), -1 for original tokens
        spliced = F.embedding(slot.clamp(min=0), self.trainable_rows())  # (..., D)
        rows = torch.where((slot >= 0).unsqueeze(-1), spliced.to(base.dtype), base)  # (..., D)
        return rows if self.embed_scale is None else rows * self.embed_scale.to(rows.dtype)  # (..., D)

    def project(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Output projection with the spliced matrix (tied LMs): (..., D) -> (..., V).

        The K new-token columns are written into the frozen projection's output in place: no second (..., V)
        tensor (linear's backward needs its inputs, not its output, so autograd allows it).
        """
        logits = F.linear(hidden_states, self.weight)  # (..., V)
        new_logits = F.linear(hidden_states, self.trainable_rows().to(hidden_states.dtype))  # (..., K)
        return logits.index_copy_(-1, self.new_token_ids, new_logits.to(logits.dtype))  # (..., V)

    def extra_repr(self) -> str:
        scaled = "" if self.embed_scale is None else ", scaled"
        return f"{self.num_embeddings}, {self.embedding_dim}, new_token_ids={self.new_token_ids.tolist()}{scaled}"


def lookup_scale(embedding: nn.Module) -> torch.Tensor | None:
    """What `embedding` multiplies each looked-up row by: its `embed_scale` (Gemma-3), or None (a plain look-up)."""
    scale = getattr(embedding, "embed_scale", None)
    return None if scale is None else torch.as_tensor(scale)


@torch.no_grad()
def check_same_lookup(original: nn.Module, spliced: SplicedEmbedding, lm_name: str, samples: int = 256) -> None:
    """ValueError unless `spliced` gives `original`'s output on a spread of ids (the new ones included): an
    embedding module that does more than a (scaled) row look-up cannot have trainable rows spliced in."""
    vocab = spliced.num_embeddings
    ids = torch.cat([torch.linspace(0, vocab - 1, min(samples, vocab)).long(), spliced.new_token_ids.cpu()])
    ids = ids.to(spliced.weight.device)[None]  # (1, n)
    expected, ours = original(ids), spliced(ids)  # (1, n, D)
    if ours.shape != expected.shape or not torch.equal(ours, expected.to(ours.dtype)):
        raise ValueError(
            f"{lm_name}: its input embedding {type(original).__name__} computes more than a row look-up (scaled by "
            "`embed_scale` at most), so the trained <image> / <|endofchunk|> rows cannot be spliced into it"
        )


class SplicedLMHead(nn.Module):
    """Output head of a tied LM: logits = hidden @ spliced_weight.T (+ the head's own frozen `bias`, CTRL's), sharing
    `SplicedEmbedding`'s parameters.

    The embedding is referenced, not registered as a child, so its parameters appear once in the model.
    """

    def __init__(self, embedding: SplicedEmbedding, bias: nn.Parameter | None = None):
        super().__init__()
        object.__setattr__(self, "_embedding", embedding)
        self.bias = bias  # (V,) or None; a Parameter keeps its `lm_head.bias` name

    @property
    def weight(self) -> torch.Tensor:
        return self._embedding.weight

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self._embedding.project(hidden_states)  # (..., V)
        return logits if self.bias is None else logits + self.bias.to(logits.dtype)


class _RouteTiedLogits(TorchFunctionMode):
    """Torch-function mode for one LM call: `F.linear(h, embedding.weight)` (no bias) -> `embedding.project(h)`.

    The frozen `weight` object is matched by identity, so nothing else is touched (the input look-up is an
    `F.embedding`). Inside `__torch_function__` the mode is off, so `project`'s own `F.linear` runs normally.
    """

    def __init__(self, embedding: SplicedEmbedding):
        super().__init__()
        self.embedding = embedding
        self.routed = 0  # how many projections were routed during the call

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            hidden_states = args[0] if args else kwargs.get("input")
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if weight is self.embedding.weight and bias is None:
                self.routed += 1
                return self.embedding.project(hidden_states)  # (..., V)
        return func(*args, **kwargs)


class TiedLogitsInForward:
    """For LMs whose forward computes the tied logits itself, as `F.linear(h, self.transformer.wte.weight)`.

    MosaicGPT (anas-awadalla/mpt-1b-redpajama-200b) and the remote MPT code (anas-awadalla/mpt-7b) have no output
    module of their own: their head reads the input embedding's `weight`, which for a `SplicedEmbedding` is the
    frozen matrix without the trained `<image>` / `<|endofchunk|>` rows. While the LM runs (a forward pre-hook
    enters, an always-called forward hook leaves), `_RouteTiedLogits` sends exactly that projection to
    `SplicedEmbedding.project`, so the logits, the LM's own loss and the rows' gradients all use the spliced
    matrix, and the state dict keeps its `...wte.weight` key. A call that never computed that projection raises:
    the trained rows would silently miss the logits.
    """

    def __init__(self) -> None:
        self._routes: list[_RouteTiedLogits] = []  # the calls in progress (one, unless the LM is re-entered)

    @classmethod
    def install(cls, lm: nn.Module) -> TiedLogitsInForward:
        router = cls()
        lm._tied_logits_in_forward = True  # Flamingo.output_head: no head module to call on hidden states
        lm.register_forward_pre_hook(router._enter)
        lm.register_forward_hook(router._leave, always_call=True)
        return router

    def _enter(self, lm: nn.Module, args) -> None:
        embedding = lm.get_input_embeddings()
        if not isinstance(embedding, SplicedEmbedding):
            raise TypeError(f"{type(lm).__name__}'s input embedding is a {type(embedding).__name__}, not spliced")
        route = _RouteTiedLogits(embedding)
        route.__enter__()
        self._routes.append(route)

    def _leave(self, lm: nn.Module, args, output) -> None:
        route = self._routes.pop()
        route.__exit__(None, None, None)
        if output is not None and route.routed == 0:  # output is None when the forward raised
            raise RuntimeError(
                f"{type(lm).__name__}: its forward did not compute the logits as F.linear(hidden_states, "
                "input_embedding.weight), so the trained <image> / <|endofchunk|> rows cannot reach them (an LM "
                "without an output-embedding module of its own must compute its tied head that way)"
            )


def splice_new_token_rows(lm: nn.Module, new_token_ids: list[int]) -> SplicedEmbedding:
    """Replace `lm`'s input embedding (and, if tied, its output head) by the spliced versions; return the embedding.

    Call after `resize_token_embeddings`: the spliced rows start from the resized matrix's rows at those ids.
    A tied head is one of: a separate output module sharing the input embedding's weight (transformers' classes;
    replaced by `SplicedLMHead`), or none / the input embedding module itself (remote MosaicGPT / MPT code, whose
    forward projects with the embedding's weight; routed by `TiedLogitsInForward`).
    """
    ensure_input_embedding_accessors(lm)
    old_input = lm.get_input_embeddings()
    old_output = lm.get_output_embeddings()
    head_in_forward = old_output is None or old_output is old_input
    tied = not head_in_forward and old_output.weight is old_input.weight
    embedding = SplicedEmbedding(old_input.weight, new_token_ids, lookup_scale(old_input))
    if not old_input.weight.is_meta:
        check_same_lookup(old_input, embedding, type(lm).__name__)
    lm.set_input_embeddings(embedding)
    if tied:
        lm.set_output_embeddings(SplicedLMHead(embedding, getattr(old_output, "bias", None)))
        # The head now reads the spliced matrix explicitly; HF must not re-tie a `.weight` onto it.
        lm.config.tie_word_embeddings = False
    elif head_in_forward:
        TiedLogitsInForward.install(lm)
    return embedding


def add_flamingo_tokens(tokenizer) -> dict[str, int]:
    """Add `<|endofchunk|>`, `<image>` (and `<PAD>` as pad if the tokenizer has none), as the reference does.

    Returns the ids looked up from the tokenizer: {'media', 'endofchunk', 'pad', 'eos'}.
    Idempotent: a tokenizer that already has the tokens keeps its ids.
    """
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [ENDOFCHUNK_TOKEN, MEDIA_TOKEN]}, replace_additional_special_tokens=False
    )
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return SpecialTokens.from_tokenizer(tokenizer).as_dict()


def resize_and_splice(lm: nn.Module, tokenizer, special_token_ids: dict[str, int]) -> SplicedEmbedding:
    """Resize `lm`'s embeddings to len(tokenizer) (may shrink a padded vocab) and splice in the new-token rows.

    Rows that exist at both sizes keep their values; new rows are initialised by transformers' resize.
    """
    ensure_input_embedding_accessors(lm)  # MosaicGPT lacks them; resize needs them
    # On the meta device there are no values to take a mean of (the rank gets its weights from rank 0).
    on_meta = lm.get_input_embeddings().weight.is_meta
    lm.resize_token_embeddings(len(tokenizer), mean_resizing=not on_meta)
    return splice_new_token_rows(lm, [special_token_ids["endofchunk"], special_token_ids["media"]])
