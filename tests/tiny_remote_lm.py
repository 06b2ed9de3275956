"""Tiny stand-ins for the remote model code of the released OpenFlamingo LMs, loaded with trust_remote_code.

`MosaicGPT` mirrors anas-awadalla/mpt-1b-redpajama-200b: config model_type `mosaic_gpt` with `d_model`, modules
`transformer.{wte, wpe, blocks, norm_f}`, blocks called as `block(x, past_key_value=, attn_bias=, attention_mask=,
is_causal=)` returning `(x, past_key_value)`, tied logits computed inside forward as
`F.linear(x, self.transformer.wte.weight)` (times `logit_scale` when set), the loss from rolled labels, a legacy
tuple KV cache, and no get_input_embeddings / get_output_embeddings. `MPTForCausalLM` mirrors anas-awadalla/mpt-7b:
model_type `mpt`, the same modules and head, and get/set_input/output_embeddings all on `transformer.wte`.

Imports only torch and transformers: `save_pretrained` copies this file next to the weights as the model's code.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class MosaicGPTConfig(PretrainedConfig):
    model_type = "mosaic_gpt"

    def __init__(
        self,
        d_model=64,
        n_heads=4,
        n_layers=2,
        mlp_ratio=4,
        max_seq_len=128,
        vocab_size=128,
        logit_scale=None,
        **kwargs,
    ):
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_layers = n_layers
        self.mlp_ratio = mlp_ratio
        self.max_seq_len = max_seq_len
        self.vocab_size = vocab_size
        self.logit_scale = logit_scale
        super().__init__(**kwargs)


class MPTConfig(MosaicGPTConfig):
    model_type = "mpt"


class Attention(nn.Module):
    def __init__(self, d_model, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.Wqkv = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x, past_key_value=None, attn_bias=None):
        b, length, d = x.shape
        q, k, v = self.Wqkv(x).split(d, dim=-1)  # each (B, L, D)
        q, k, v = (t.view(b, length, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))  # (B, H, L, d_h)
        if past_key_value is not None:
            k = torch.cat([past_key_value[0], k], dim=2)  # (B, H, L_past + L, d_h)
            v = torch.cat([past_key_value[1], v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)  # (B, H, L, d_h)
        return self.out_proj(out.transpose(1, 2).reshape(b, length, d)), (k, v)


class GPTBlock(nn.Module):
    def __init__(self, d_model, n_heads, mlp_ratio):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(), nn.Linear(mlp_ratio * d_model, d_model)
        )

    def forward(self, x, past_key_value=None, attn_bias=None, attention_mask=None, is_causal=True):
        attended, past_key_value = self.attn(self.ln_1(x), past_key_value=past_key_value, attn_bias=attn_bias)
        x = x + attended
        x = x + self.mlp(self.ln_2(x))
        return x, past_key_value


class MosaicGPT(PreTrainedModel):
    config_class = MosaicGPTConfig
    base_model_prefix = "transformer"

    def __init__(self, config):
        super().__init__(config)
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.vocab_size, config.d_model),
                "wpe": nn.Embedding(config.max_seq_len, config.d_model),
                "blocks": nn.ModuleList(
                    [
                        GPTBlock(config.d_model, config.n_heads, config.mlp_ratio)
                        for _ in range(config.n_layers)
                    ]
                ),
                "norm_f": nn.LayerNorm(config.d_model),
            }
        )
        self.logit_scale = config.logit_scale
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, nn.Linear | nn.Embedding):
            module.weight.data.normal_(0.0, 0.1)
        if isinstance(module, nn.Linear):
            module.bias.data.zero_()

    def _attn_bias(self, attention_mask, query_length):
        """(B, 1, L, L_past + L) additive mask: causal and key padding."""
        key_length = attention_mask.shape[1]
        causal = torch.ones(query_length, key_length, dtype=torch.bool, device=attention_mask.device)
        causal = causal.tril(diagonal=key_length - query_length)  # (L, L_k)
        allowed = causal[None, None] & attention_mask[:, None, None, :]  # (B, 1, L, L_k)
        bias = torch.zeros(allowed.shape, dtype=self.transformer.wte.weight.dtype, device=allowed.device)
        return bias.masked_fill(~allowed, torch.finfo(bias.dtype).min)

    def forward(
        self,
        input_ids,
        past_key_values=None,
        attention_mask=None,
        labels=None,
        return_dict=None,
        output_attentions=None,
        output_hidden_states=None,
        use_cache=None,
    ):
        batch, length = input_ids.shape
        past_length = past_key_values[0][0].shape[2] if past_key_values is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(
                batch, past_length + length, dtype=torch.bool, device=input_ids.device
            )
        attention_mask = attention_mask.bool()
        positions = torch.arange(past_length, past_length + length, device=input_ids.device)  # (L,)
        x = self.transformer.wte(input_ids) + self.transformer.wpe(positions)  # (B, L, D)
        attn_bias = self._attn_bias(attention_mask, length)
        presents, hidden_states = [], []
        for i, block in enumerate(self.transformer.blocks):
            hidden_states.append(x)
            past = past_key_values[i] if past_key_values is not None else None
            x, present = block(
                x, past_key_value=past, attn_bias=attn_bias, attention_mask=attention_mask, is_causal=True
            )
            presents.append(present)
        x = self.transformer.norm_f(x)
        logits = F.linear(x, self.transformer.wte.weight)  # (B, L, V): the tied head, inside forward
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        loss = None
        if labels is not None:
            targets = torch.roll(labels, shifts=-1, dims=1)
            targets[:, -1] = -100
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=tuple(presents) if use_cache else None,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
        )

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, inputs_embeds=None, **kwargs):
        if inputs_embeds is not None:
            raise NotImplementedError("inputs_embeds is not implemented for MosaicGPT yet")
        attention_mask = kwargs["attention_mask"].bool()
        if attention_mask[:, -1].sum() != attention_mask.shape[0]:
            raise NotImplementedError("MosaicGPT does not support generation with right padding.")
        if past_key_values is not None:
            input_ids = input_ids[:, -1].unsqueeze(-1)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "past_key_values": past_key_values,
            "use_cache": kwargs.get("use_cache", True),
        }


class MPTForCausalLM(MosaicGPT):
    config_class = MPTConfig

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    def get_output_embeddings(self):
        return self.transformer.wte

    def set_output_embeddings(self, new_embeddings):
        self.transformer.wte = new_embeddings
