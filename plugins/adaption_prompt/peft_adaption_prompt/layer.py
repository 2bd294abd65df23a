"""The adapted attention module: a Llama-style attention plus gated attention over learned prompts.

For each adapter the layer holds ``adaption_prompt`` (``1 x adapter_len x hidden_size``) and
``adaption_gate`` (one scalar, zero at init); both names are the reference library's, so the
checkpoint keys (``...self_attn.adaption_prompt``, ``...self_attn.adaption_gate``) are the same.

Given the input ``h`` of the wrapped attention (queries ``q = RoPE(q_proj(h))``, one row per
position), an adapter adds ``o_proj(g * softmax(q Kᵀ / sqrt(d)) V)`` to the attention output, with
``K = k_proj(P)`` and ``V = v_proj(P)`` the projections of its prompt ``P``, shared by the query
heads of a key/value group (grouped-query attention). The softmax runs over the prompt positions
alone and in float32; no mask applies, since the prompt is visible from every position. Several
active adapters add their terms.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from peft_core.layer import AdapterLayer
from torch import nn

from peft_adaption_prompt.config import AdaptionPromptConfig

__all__ = ["AdaptedAttention", "AttentionShape", "is_supported_attention"]

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
# Attention variants that normalise queries/keys per head (Qwen3, OLMo2, Gemma3): the prompt's keys
# would need the same normalisation, which neither this plugin nor the reference applies.
_QK_NORMS = ("q_norm", "k_norm", "q_layernorm", "k_layernorm")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(x1, x2) -> (-x2, x1)`` on the two halves of the last dimension (the RoPE convention of Llama)."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def is_supported_attention(module: nn.Module) -> bool:
    """Whether ``module`` is a Llama-style attention: q/k/v/o projections with weights, a ``head_dim``,
    and no per-head query/key normalisation."""
    for name in _PROJECTIONS:
        projection = getattr(module, name, None)
        if not isinstance(projection, nn.Module) or not isinstance(
            getattr(projection, "weight", None), torch.Tensor
        ):
            return False
    if any(hasattr(module, name) for name in _QK_NORMS):
        return False
    return isinstance(getattr(module, "head_dim", None), int)


class AttentionShape:
    """Head counts and sizes of a wrapped attention module, read from its projections."""

    def __init__(self, attention: nn.Module) -> None:
        self.head_dim: int = attention.head_dim
        q_out, self.hidden_size = attention.q_proj.weight.shape
        k_out = attention.k_proj.weight.shape[0]
        if q_out % self.head_dim or k_out % self.head_dim:
            raise ValueError(
                f"The attention's q_proj/k_proj output sizes ({q_out}, {k_out}) are not multiples of its head_dim "
                f"({self.head_dim}); adaption prompts need a Llama-style attention."
            )
        self.num_heads = q_out // self.head_dim
        self.num_kv_heads = k_out // self.head_dim
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"{self.num_heads} query heads cannot share {self.num_kv_heads} key/value heads evenly."
            )


class AdaptedAttention(AdapterLayer):
    """Wraps one attention module (``base_layer``) and adds the adaption prompts of its active adapters."""

    adapter_layer_names = ("adaption_prompt", "adaption_gate")
    other_param_names = ("adapter_len",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.adaption_prompt = nn.ParameterDict()
        self.adaption_gate = nn.ParameterDict()
        self.adapter_len: dict[str, int] = {}
        self.attention_shape = AttentionShape(self.get_base_layer())

    # ------------------------------------------------------------------ adapters
    def update_layer(
        self, adapter_name: str, config: AdaptionPromptConfig, *, key: str = "", **kwargs: Any
    ) -> None:
        """Add ``adapter_name``: standard-normal prompt vectors and a zero gate.

        They live on the device of the attention's weights and in their dtype (float32 for a
        quantized attention), as in the reference library; ``get_peft_model`` keeps half-precision
        adapters in float32 unless ``autocast_adapter_dtype=False``.
        """
        reference = self.get_base_layer().q_proj.weight
        dtype = reference.dtype if reference.dtype.is_floating_point else torch.float32
        length = int(config.adapter_len)
        # Standard normal prompts, as the original implementation (an nn.Embedding) and the reference start them;
        # drawn the same way, so a seeded model gets the reference's very values.
        prompt = torch.empty(
            1, length, self.attention_shape.hidden_size, device=reference.device, dtype=dtype
        ).normal_()
        self.adaption_prompt[adapter_name] = nn.Parameter(prompt)
        self.adaption_gate[adapter_name] = nn.Parameter(torch.zeros(1, device=reference.device, dtype=dtype))
        self.adapter_len[adapter_name] = length
        self.set_adapter(self.active_adapters)

    def merge_one(self, adapter_name: str, *, safe_merge: bool = False) -> None:
        raise TypeError(
            "Adaption prompts cannot be merged into the base weights: they add an attention over learned "
            "prompts, which no weight change reproduces. Keep the adapter unmerged (or unload() it)."
        )

    # ------------------------------------------------------------------ forward
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        output = self.base_layer(*args, **kwargs)
        if self.disable_adapters:
            return output
        active = [name for name in self.active_adapters if name in self.adaption_prompt]
        if not active:
            return output
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        position_embeddings = kwargs.get("position_embeddings")
        if position_embeddings is None and len(args) > 1:
            position_embeddings = args[1]
        if position_embeddings is None:
            raise TypeError(
                f"{type(self.get_base_layer()).__name__} was called without position_embeddings (cos, sin); adaption "
                "prompts need the rotary embeddings the decoder layer passes to its attention (transformers >= 4.48)."
            )
        attn_output, *rest = output if isinstance(output, tuple) else (output,)
        queries = self._rotated_queries(hidden_states, position_embeddings)
        added = self._prompt_output(active[0], queries)
        for name in active[1:]:
            added = added + self._prompt_output(name, queries)
        result = (attn_output + added).to(attn_output.dtype)
        return (result, *rest) if isinstance(output, tuple) else result

    def _rotated_queries(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """The attention's queries, ``(batch, heads, seq, head_dim)``, with the rotary embedding applied.

        The wrapped module computes them too but does not return them; recomputing costs one q_proj.
        """
        batch, length = hidden_states.shape[:2]
        attention = self.get_base_layer()
        queries = attention.q_proj(hidden_states).view(
            batch, length, self.attention_shape.num_heads, self.attention_shape.head_dim
        )
        queries = queries.transpose(1, 2)
        cos, sin = (t.unsqueeze(1) for t in position_embeddings)  # one (cos, sin) per position, for all heads
        return queries * cos + _rotate_half(queries) * sin

    def _prompt_output(self, adapter_name: str, queries: torch.Tensor) -> torch.Tensor:
        """``adapter_name``'s gated attention over its prompt, projected by o_proj: ``(batch, seq, hidden)``."""
        attention = self.get_base_layer()
        shape = self.attention_shape
        length = self.adapter_len[adapter_name]
        prompt = self.adaption_prompt[adapter_name]
        weight_dtype = attention.k_proj.weight.dtype
        if weight_dtype.is_floating_point:
            prompt = prompt.to(weight_dtype)

        def heads(projection: nn.Module) -> torch.Tensor:
            # (1, kv_heads, adapter_len, head_dim), each key/value head repeated for the query heads of its group
            states = projection(prompt).view(1, length, shape.num_kv_heads, shape.head_dim).transpose(1, 2)
            return states.repeat_interleave(shape.num_heads // shape.num_kv_heads, dim=1)

        dtype = queries.dtype
        keys, values = heads(attention.k_proj).to(dtype), heads(attention.v_proj).to(dtype)
        scores = torch.matmul(queries, keys.transpose(2, 3)) / math.sqrt(shape.head_dim)
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
        weights = self.adaption_gate[adapter_name].to(dtype) * weights
        batch, _, seq = queries.shape[:3]
        mixed = (
            torch.matmul(weights, values)
            .transpose(1, 2)
            .reshape(batch, seq, shape.num_heads * shape.head_dim)
        )
        out_proj = attention.o_proj
        added = out_proj(
            mixed.to(out_proj.weight.dtype) if out_proj.weight.dtype.is_floating_point else mixed
        )
        bias = getattr(out_proj, "bias", None)
        if isinstance(bias, torch.Tensor):
            # The attention output already carries o_proj's bias once; a zero gate must add exactly nothing.
            added = added - bias
        return added
