"""VeRA layers for ``nn.Linear`` and transformers' ``Conv1D``.

Each adapter trains two vectors, ``vera_lambda_d`` (r) and ``vera_lambda_b`` (out), around a pair
of frozen random projections shared by every layer of the model (``vera_A``: r x in,
``vera_B``: out x r; a layer uses the top-left block that fits it):

    y = base(x) + lambda_b * B(lambda_d * A(dropout(x)))

which merges as the additive delta ``(lambda_b * B) @ (lambda_d * A)`` (transposed for
``Conv1D``). Attribute names are the reference library's, so ``model.state_dict()`` keys match.
The projections are owned by :class:`peft_vera.model.VeraModel`, which hands the same
:class:`~peft_vera.projections.BufferDict` to every layer (:meth:`VeraLayer.attach_projections`).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from peft_core.errors import ConfigError
from peft_core.layer import AdapterLayer
from torch import nn

from peft_vera.config import VeraConfig
from peft_vera.projections import BufferDict

__all__ = ["Linear", "VeraLayer", "is_transformers_conv1d"]


def is_transformers_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D``, without importing transformers."""
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D)


class VeraLayer(AdapterLayer):
    """What every VeRA layer shares: the vectors, the shared projections and the additive delta."""

    adapter_layer_names = ("vera_lambda_b", "vera_lambda_d")
    other_param_names = ("r", "vera_dropout")

    def __init__(self, base_layer: nn.Module, *, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.r: dict[str, int] = {}
        self.vera_dropout = nn.ModuleDict()
        self.vera_lambda_b = nn.ParameterDict()
        self.vera_lambda_d = nn.ParameterDict()
        # Set by VeraModel: the model-wide projections (the same BufferDict objects in every layer).
        self.vera_A: BufferDict | None = None
        self.vera_B: BufferDict | None = None
        self.fan_in_fan_out = fan_in_fan_out
        self.in_features, self.out_features = self._features(self.get_base_layer())

    def _features(self, base: nn.Module) -> tuple[int, int]:
        if isinstance(base, nn.Linear):
            return base.in_features, base.out_features
        n_in, n_out = base.weight.shape  # transformers' Conv1D stores (in, out)
        return int(n_in), int(n_out)

    # ------------------------------------------------------------------ adapters
    def update_layer(self, adapter_name: str, config: VeraConfig, *, key: str = "", **kwargs: Any) -> None:
        """Add ``adapter_name``'s vectors; its projections are attached by the adapter model."""
        self.r[adapter_name] = config.r
        self.vera_dropout[adapter_name] = (
            nn.Dropout(p=config.vera_dropout) if config.vera_dropout > 0.0 else nn.Identity()
        )
        # The same draws as the reference (ones, then a normal vector, also when they are reset for the
        # default init), so that a seeded init_weights=False adapter is identical in both libraries.
        self.vera_lambda_b[adapter_name] = nn.Parameter(torch.ones(self.out_features))
        self.vera_lambda_d[adapter_name] = nn.Parameter(torch.randn(config.r))
        if config.init_weights:
            with torch.no_grad():
                self.vera_lambda_d[adapter_name].fill_(config.d_initial)
                self.vera_lambda_b[adapter_name].zero_()
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def attach_projections(self, vera_A: BufferDict, vera_B: BufferDict) -> None:
        """Use the model-wide projections (registered as submodules, as in the reference)."""
        self.vera_A = vera_A
        self.vera_B = vera_B

    def check_projections(self, adapter_name: str, key: str = "") -> None:
        """Refuse projections too small for this layer (a later adapter reuses the first one's)."""
        vera_A, vera_B = self._shared(adapter_name)
        rows, cols = vera_A.shape
        out_rows, r_cols = vera_B.shape
        r = self.r[adapter_name]
        where = f" for {key!r}" if key else ""
        if cols < self.in_features or out_rows < self.out_features:
            raise ConfigError(
                f"The shared VeRA projections ({cols} inputs, {out_rows} outputs) are too small{where}, which needs "
                f"{self.in_features} inputs and {self.out_features} outputs. All adapters of a model share the "
                "projections sized for the first adapter's targets; add the adapter whose targets are largest first."
            )
        if rows < r or r_cols < r:
            raise ConfigError(
                f"Adapter {adapter_name!r} has r={r}, but the shared VeRA projections have rank {min(rows, r_cols)} "
                "(set by the first adapter). Use an r no larger than the first adapter's, or add this adapter first."
            )

    def _shared(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.vera_A is None or self.vera_B is None or adapter_name not in self.vera_A:
            raise RuntimeError(
                f"This VeRA layer has no shared projections for adapter {adapter_name!r}. VeRA layers get them from "
                "the VeRA adapter model (get_peft_model / PeftModel); they cannot be used on their own."
            )
        return self.vera_A[adapter_name], self.vera_B[adapter_name]

    def projections(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks of the shared ``(A, B)`` this layer uses: ``(r, in)`` and ``(out, r)``."""
        vera_A, vera_B = self._shared(adapter_name)
        r = self.r[adapter_name]
        return vera_A[:r, : self.in_features], vera_B[: self.out_features, :r]

    # ------------------------------------------------------------------ merging
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``(lambda_b * B) @ (lambda_d * A)``, in the base weight's layout (transposed for ``Conv1D``)."""
        sliced_A, sliced_B = self.projections(adapter_name)
        lambda_b = self.vera_lambda_b[adapter_name]
        lambda_d = self.vera_lambda_d[adapter_name]
        dtype = sliced_B.dtype
        # Half-precision matmuls are slow (or missing) on many CPUs: compute in float32 there.
        upcast = lambda_d.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
        if upcast:
            sliced_A, sliced_B = sliced_A.float(), sliced_B.float()
            lambda_b, lambda_d = lambda_b.float(), lambda_d.float()
        sliced_A = sliced_A.to(lambda_d.device)
        sliced_B = sliced_B.to(lambda_d.device)
        delta = (lambda_b.unsqueeze(-1) * sliced_B) @ (lambda_d.unsqueeze(-1) * sliced_A)
        if self.fan_in_fan_out:
            delta = delta.T
        return delta.to(dtype) if upcast else delta

    def __repr__(self) -> str:
        return "vera." + super().__repr__()


class Linear(VeraLayer):
    """VeRA on ``nn.Linear``, or on transformers' ``Conv1D`` with ``fan_in_fan_out=True``."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: VeraConfig,
        *,
        key: str = "",
        fan_in_fan_out: bool = False,
    ) -> None:
        super().__init__(base_layer, fan_in_fan_out=fan_in_fan_out)
        self._active_adapters = [adapter_name]
        self.update_layer(adapter_name, config, key=key)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            # As in the reference: disabling a merged layer unmerges it, so the output is the base's.
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        previous_dtype = x.dtype
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.vera_lambda_d:
                continue
            lambda_b = self.vera_lambda_b[name]
            lambda_d = self.vera_lambda_d[name]
            sliced_A, sliced_B = self.projections(name)
            x = self._cast_to_adapter_dtype(x, lambda_d.dtype)
            hidden = lambda_d * F.linear(self.vera_dropout[name](x), sliced_A.to(x.device))
            result = result + lambda_b * F.linear(hidden, sliced_B.to(x.device))
        return result.to(result_dtype).to(previous_dtype)
