"""Tiny base models, one family per layer kind, that the conformance kit adapts.

A :class:`ModelCase` says how to build a base model, how to feed it and which modules to target.
Building is seeded, so every call gives the same weights: a check can compare an adapted model
with a pristine copy of its base. Sizes are arguments of the ``*_case`` builders, so
:mod:`peft_core.testing.strategies` can generate models as well as configs; the
``transformers`` cases import ``transformers`` only when a model is built.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from attrs import field, frozen
from torch import nn

__all__ = [
    "LAYER_KINDS",
    "ModelCase",
    "conv_case",
    "embedding_case",
    "gpt2_conv1d_case",
    "llama_case",
    "mlp_case",
    "model_output",
    "standard_model_cases",
]

LAYER_KINDS = ("linear", "embedding", "conv1d", "conv2d", "conv3d", "transformers_conv1d", "llama")
"""Layer kinds of the standard cases: a method's conformance class lists those it supports."""

InputMaker = Callable[[torch.Generator], dict[str, torch.Tensor]]


def _as_tuple(value: Sequence[str] | str) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


@frozen(kw_only=True)
class ModelCase:
    """A base model to adapt: how to build it, how to feed it, and which modules to target.

    ``builder()`` returns a fresh model (it is called under a fixed seed), ``input_maker(g)``
    returns the keyword arguments of one forward call, drawn from the generator ``g``.
    """

    name: str
    layer_kind: str
    builder: Callable[[], nn.Module]
    input_maker: InputMaker
    target_modules: tuple[str, ...] = field(converter=_as_tuple)
    """Module names a config should target (suffixes of module paths)."""
    modules_to_save: tuple[str, ...] = field(default=(), converter=_as_tuple)
    """Untargeted modules a config may list in ``modules_to_save`` (e.g. a head)."""

    def build(self, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
        """The base model in ``dtype`` and eval mode; the same weights for the same ``seed``."""
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = self.builder()
        return model.to(dtype).eval()

    def make_inputs(
        self, generator: torch.Generator | int = 0, dtype: torch.dtype = torch.float32
    ) -> dict[str, torch.Tensor]:
        """Keyword inputs of one forward call; floating inputs are cast to ``dtype``."""
        if isinstance(generator, int):
            generator = torch.Generator().manual_seed(generator)
        inputs = self.input_maker(generator)
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}

    def __repr__(self) -> str:  # hypothesis prints this in falsifying examples
        return f"ModelCase({self.name!r})"


def model_output(output: object) -> torch.Tensor:
    """The main tensor of a model's output (the tensor itself, ``logits`` or ``last_hidden_state``)."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("logits", "last_hidden_state"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"Cannot find the output tensor in a {type(output).__name__}; return a tensor or logits.")


# ---------------------------------------------------------------------- the model families
class _MLP(nn.Module):
    def __init__(self, d_in: int, hidden: int, d_out: int, bias: bool) -> None:
        super().__init__()
        self.lin0 = nn.Linear(d_in, hidden, bias=bias)
        self.act = nn.Tanh()  # smooth: an adapter change always reaches the output (no dead ReLUs)
        self.lin1 = nn.Linear(hidden, d_in, bias=bias)
        self.head = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lin1(self.act(self.lin0(x))))


class _Embed(nn.Module):
    def __init__(self, vocab: int, dim: int, d_out: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(x))


class _Conv(nn.Module):
    def __init__(self, dims: int, c_in: int, c_mid: int, kernel: int, d_out: int, bias: bool) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.conv = conv(c_in, c_mid, kernel_size=kernel, padding=kernel // 2)
        self.conv_b = conv(c_mid, c_in, kernel_size=1, bias=bias)
        self.head = nn.Linear(c_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_b(torch.tanh(self.conv(x)))
        return self.head(h.flatten(2).mean(-1))


class _GPT2Style(nn.Module):
    def __init__(self, d_in: int, hidden: int, d_out: int) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.c_attn = Conv1D(hidden, d_in)  # Conv1D(nf=out, nx=in) stores its weight as (in, out)
        self.c_proj = Conv1D(d_in, hidden)
        self.head = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.c_proj(torch.tanh(self.c_attn(x))))


def _floats(*shape: int) -> InputMaker:
    return lambda g: {"x": torch.randn(*shape, generator=g)}


def mlp_case(
    d_in: int = 8, hidden: int = 12, d_out: int = 4, batch: Sequence[int] = (3,), bias: bool = True
) -> ModelCase:
    """``nn.Linear`` targets ``lin0`` and ``lin1`` (with or without biases) and a linear ``head``."""
    return ModelCase(
        name=f"mlp_{d_in}x{hidden}x{d_out}" + ("" if bias else "_nobias"),
        layer_kind="linear",
        builder=lambda: _MLP(d_in, hidden, d_out, bias),
        input_maker=_floats(*batch, d_in),
        target_modules=("lin0", "lin1"),
        modules_to_save=("head",),
    )


def embedding_case(vocab: int = 20, dim: int = 8, d_out: int = 4, batch: Sequence[int] = (3, 5)) -> ModelCase:
    """An ``nn.Embedding`` target ``emb`` feeding a linear head."""
    return ModelCase(
        name=f"embedding_{vocab}x{dim}",
        layer_kind="embedding",
        builder=lambda: _Embed(vocab, dim, d_out),
        input_maker=lambda g: {"x": torch.randint(0, vocab, tuple(batch), generator=g)},
        target_modules=("emb",),
        modules_to_save=("head",),
    )


def conv_case(
    dims: int = 2,
    c_in: int = 3,
    c_mid: int = 6,
    kernel: int = 3,
    size: int = 5,
    batch: int = 2,
    bias: bool = True,
) -> ModelCase:
    """``nn.Conv{dims}d`` targets ``conv`` (``kernel``, same padding) and ``conv_b`` (1x1, ``bias``)."""
    if dims not in (1, 2, 3):
        raise ValueError(f"dims={dims!r}: conv cases exist for 1, 2 and 3 spatial dimensions.")
    return ModelCase(
        name=f"conv{dims}d_{c_in}x{c_mid}_k{kernel}_s{size}" + ("" if bias else "_nobias"),
        layer_kind=f"conv{dims}d",
        builder=lambda: _Conv(dims, c_in, c_mid, kernel, 2, bias),
        input_maker=_floats(batch, c_in, *([size] * dims)),
        target_modules=("conv", "conv_b"),
        modules_to_save=("head",),
    )


def gpt2_conv1d_case(
    d_in: int = 8, hidden: int = 12, d_out: int = 4, batch: Sequence[int] = (3,)
) -> ModelCase:
    """``transformers.pytorch_utils.Conv1D`` targets ``c_attn`` and ``c_proj`` (GPT-2's layer type)."""
    return ModelCase(
        name=f"gpt2_conv1d_{d_in}x{hidden}",
        layer_kind="transformers_conv1d",
        builder=lambda: _GPT2Style(d_in, hidden, d_out),
        input_maker=_floats(*batch, d_in),
        target_modules=("c_attn", "c_proj"),
        modules_to_save=("head",),
    )


def llama_case(
    hidden: int = 16, layers: int = 2, heads: int = 2, kv_heads: int = 1, batch: int = 2, seq: int = 6
) -> ModelCase:
    """A tiny ``LlamaForCausalLM`` (vocabulary 32) with targets ``q_proj`` and ``v_proj``."""
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"hidden={hidden} must divide by heads={heads}, and heads by kv_heads={kv_heads}.")

    def build() -> nn.Module:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=32,
            hidden_size=hidden,
            intermediate_size=hidden + hidden // 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=max(16, seq),
        )
        return LlamaForCausalLM(config)

    return ModelCase(
        name=f"llama_h{hidden}_l{layers}_heads{heads}",
        layer_kind="llama",
        builder=build,
        input_maker=lambda g: {"input_ids": torch.randint(0, 32, (batch, seq), generator=g)},
        target_modules=("q_proj", "v_proj"),
        modules_to_save=(),
    )


def standard_model_cases() -> list[ModelCase]:
    """One tiny case, of fixed sizes, per layer kind in :data:`LAYER_KINDS`."""
    return [
        mlp_case(),
        embedding_case(),
        conv_case(1, size=7),
        conv_case(2),
        conv_case(3, size=4, batch=1),
        gpt2_conv1d_case(),
        llama_case(),
    ]
