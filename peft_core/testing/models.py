"""Tiny base models, one per layer kind, that the conformance kit adapts.

Each :class:`ModelCase` builds the same weights on every call (a fixed seed), so a kit check
can compare an adapted model against a pristine copy of its base.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from attrs import frozen
from torch import nn

__all__ = ["ModelCase", "model_output", "standard_model_cases"]


@frozen
class ModelCase:
    """A base model to adapt: how to build it, feed it, and which modules to target."""

    name: str
    layer_kind: str
    builder: Callable[[], nn.Module]
    input_maker: Callable[[torch.Generator], dict[str, torch.Tensor]]
    target_modules: tuple[str, ...]
    modules_to_save: tuple[str, ...] = ()
    """Modules a config may list in ``modules_to_save`` (not among the targets)."""

    def build(self, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = self.builder()
        return model.to(dtype).eval()

    def make_inputs(self, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        inputs = self.input_maker(torch.Generator().manual_seed(seed))
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}

    def __repr__(self) -> str:  # readable hypothesis reports
        return f"ModelCase({self.name!r})"


def model_output(output: object) -> torch.Tensor:
    """The main tensor of a model's output (logits, last hidden state, or the tensor itself)."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("logits", "last_hidden_state"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"Cannot find the output tensor in {type(output).__name__}.")


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(8, 12)
        self.act = nn.ReLU()
        self.lin1 = nn.Linear(12, 8, bias=False)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lin1(self.act(self.lin0(x))))


class _Embed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(x))


class _Conv(nn.Module):
    def __init__(self, dims: int) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.conv = conv(3, 6, kernel_size=3, padding=1)
        self.conv_b = conv(6, 4, kernel_size=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_b(torch.relu(self.conv(x)))
        return self.head(h.flatten(2).mean(-1))


class _GPT2Style(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.c_attn = Conv1D(12, 8)  # (nf=out, nx=in): weight stored (in, out)
        self.c_proj = Conv1D(8, 12)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.c_proj(torch.tanh(self.c_attn(x))))


def _tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
    )
    return LlamaForCausalLM(config)


def _floats(*shape: int) -> Callable[[torch.Generator], dict[str, torch.Tensor]]:
    return lambda g: {"x": torch.randn(*shape, generator=g)}


def standard_model_cases() -> list[ModelCase]:
    """One tiny case per layer kind the kit knows (``transformers`` is imported only when built)."""
    return [
        ModelCase("mlp", "linear", _MLP, _floats(3, 8), ("lin0", "lin1"), ("head",)),
        ModelCase(
            "embedding",
            "embedding",
            _Embed,
            lambda g: {"x": torch.randint(0, 20, (3, 5), generator=g)},
            ("emb",),
            ("head",),
        ),
        ModelCase("conv1d", "conv1d", lambda: _Conv(1), _floats(2, 3, 7), ("conv", "conv_b"), ("head",)),
        ModelCase("conv2d", "conv2d", lambda: _Conv(2), _floats(2, 3, 5, 5), ("conv", "conv_b"), ("head",)),
        ModelCase(
            "conv3d", "conv3d", lambda: _Conv(3), _floats(1, 3, 4, 4, 4), ("conv", "conv_b"), ("head",)
        ),
        ModelCase(
            "gpt2_conv1d", "transformers_conv1d", _GPT2Style, _floats(3, 8), ("c_attn", "c_proj"), ("head",)
        ),
        ModelCase(
            "tiny_llama",
            "llama",
            _tiny_llama,
            lambda g: {"input_ids": torch.randint(0, 32, (2, 6), generator=g)},
            ("q_proj", "v_proj"),
            (),
        ),
    ]
