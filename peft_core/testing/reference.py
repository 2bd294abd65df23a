"""Trivially correct references for the adapter state machine.

The state machine compares a live model, after any sequence of operations, with what it should
compute. Two references exist:

* :class:`DenseReference` (used whenever it applies): each adapter's effect is measured once,
  when the adapter is added, by *probing* every adapted layer's unmerged forward with basis
  inputs. A merge-able layer computes an affine map, so the probe yields a dense weight and bias
  in the base layer's own layout (``f(0)`` is the bias, ``f(e_i) - f(0)`` a column of the
  weight; for an embedding, ``f(i)`` is row ``i``; for a convolution, one-hot inputs the size of
  the kernel, read at the output position whose window covers them). The reference model is then
  a plain copy of the base with ``W + sum of the active adapters' deltas`` (several active
  adapters add up, as in LoRA; methods that compose otherwise opt out, see
  ``MethodConformance.additive_adapters``): no adapter layer, no merge, unmerge, save, load or
  delete code runs on that side.
* :class:`RebuiltReference` (fallback, for methods that are not mergeable, where a layer need not
  be affine, for base layers the probe does not understand, and for several active adapters of a
  non-additive method): a fresh, never-merged model rebuilt from each adapter's config and the
  tensors it had when it was added.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from peft_core import (
    PeftConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from peft_core.layer import AdapterLayer
from peft_core.modules_to_save import ModulesToSaveWrapper
from peft_core.testing.models import model_output

__all__ = ["DenseReference", "NotProbeable", "RebuiltReference", "dense_affine"]

Dense = tuple[torch.Tensor, "torch.Tensor | None"]


class NotProbeable(Exception):
    """A layer whose dense weight the probe cannot recover; use :class:`RebuiltReference`."""


def _is_transformers_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def dense_affine(fn: Callable[[torch.Tensor], torch.Tensor], base: nn.Module) -> Dense:
    """Weight and bias, in ``base``'s parameter layout, of the affine map ``fn`` on ``base``'s inputs.

    Raises :class:`NotProbeable` for module types or geometries it does not handle.
    """
    weight = base.weight
    with torch.no_grad():
        if isinstance(base, nn.Embedding):
            ids = torch.arange(base.num_embeddings, device=weight.device)[None]
            return fn(ids)[0].clone(), None
        if isinstance(base, nn.Linear) or _is_transformers_conv1d(base):
            n_in = base.in_features if isinstance(base, nn.Linear) else weight.shape[0]
            probe = torch.cat([torch.zeros(1, n_in), torch.eye(n_in)]).to(weight)
            out = fn(probe)
            bias, columns = out[0], out[1:] - out[0]
            return (columns.T if isinstance(base, nn.Linear) else columns).contiguous(), bias
        if isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return _dense_conv(fn, base)
    raise NotProbeable(f"cannot probe a {type(base).__name__}")


def _dense_conv(fn: Callable[[torch.Tensor], torch.Tensor], base: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> Dense:
    kernel, padding = tuple(base.kernel_size), base.padding
    if (
        base.groups != 1
        or base.padding_mode != "zeros"
        or isinstance(padding, str)
        or any(s != 1 for s in base.stride)
        or any(d != 1 for d in base.dilation)
    ):
        raise NotProbeable(f"conv geometry {base} is not probed")
    c_in, n = base.in_channels, base.in_channels * math.prod(kernel)
    # One-hot inputs exactly the size of the kernel; with stride 1 the output at index ``padding``
    # sees the whole input through the whole kernel.
    probe = torch.cat([torch.zeros(1, n), torch.eye(n)]).reshape(n + 1, c_in, *kernel).to(base.weight)
    out = fn(probe)[(slice(None), slice(None), *padding)]
    bias, columns = out[0], out[1:] - out[0]
    return columns.T.reshape(base.weight.shape).contiguous(), bias


def _adapter_paths(model: PeftModel) -> dict[str, AdapterLayer]:
    return dict(model.base_model.named_adapter_layers())


class DenseReference:
    """Plain copies of the base with each active adapter's probed dense delta added."""

    def __init__(self, base: nn.Module) -> None:
        self.base = base
        self.deltas: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor | None]]] = {}
        self.saved_copies: dict[str, dict[str, dict[str, torch.Tensor]]] = {}

    def record(self, model: PeftModel, name: str, config: PeftConfig) -> None:
        """Measure adapter ``name`` of ``model`` (unmerged) by probing a copy with only it active."""
        probe_model = copy.deepcopy(model)
        probe_model.base_model.enable_adapter_layers()
        probe_model.set_adapter(name)
        deltas = {}
        for path, layer in _adapter_paths(probe_model).items():
            if name not in layer.adapter_names:
                continue
            if layer.merged:
                raise RuntimeError(f"record({name!r}) needs an unmerged model; {path} is merged.")
            original = self.base.get_submodule(path)
            weight, bias = dense_affine(layer, layer.get_base_layer())
            d_bias = None
            if bias is not None:
                base_bias = (
                    original.bias if getattr(original, "bias", None) is not None else torch.zeros_like(bias)
                )
                d_bias = bias - base_bias
            deltas[path] = (weight - original.weight, d_bias)
        self.deltas[name] = deltas
        self.saved_copies[name] = _saved_copies(probe_model, name)

    def forget(self, name: str) -> None:
        self.deltas.pop(name, None)
        self.saved_copies.pop(name, None)

    def model(self, active: list[str], disabled: bool) -> nn.Module:
        reference = copy.deepcopy(self.base)
        if disabled:
            return reference
        with torch.no_grad():
            for name in active:
                for path, (d_weight, d_bias) in self.deltas[name].items():
                    module = reference.get_submodule(path)
                    module.weight += d_weight
                    if d_bias is not None and d_bias.abs().max() > 0:
                        if module.bias is None:
                            module.bias = nn.Parameter(d_bias.clone())
                        else:
                            module.bias += d_bias
                for path, tensors in self.saved_copies[name].items():
                    reference.get_submodule(path).load_state_dict(tensors)
        return reference

    def output(self, active: list[str], disabled: bool, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return model_output(self.model(active, disabled)(**inputs))


def _saved_copies(model: PeftModel, name: str) -> dict[str, dict[str, torch.Tensor]]:
    copies = {}
    for path, module in model.base_model.model.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and name in module.modules_to_save:
            copies[path] = {
                k: v.detach().clone() for k, v in module.modules_to_save[name].state_dict().items()
            }
    return copies


class RebuiltReference:
    """A fresh, never-merged model with every adapter rebuilt from its config and recorded tensors."""

    def __init__(self, base: nn.Module) -> None:
        self.base = base
        self.configs: dict[str, PeftConfig] = {}
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}

    def record(self, model: PeftModel, name: str, config: PeftConfig) -> None:
        self.configs[name] = config
        self.tensors[name] = {
            k: v.clone() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()
        }

    def forget(self, name: str) -> None:
        self.configs.pop(name, None)
        self.tensors.pop(name, None)

    def output(self, active: list[str], disabled: bool, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        model: Any = copy.deepcopy(self.base)
        if not disabled:
            names = list(self.configs)
            model = get_peft_model(model, self.configs[names[0]], adapter_name=names[0])
            for name in names[1:]:
                model.add_adapter(name, self.configs[name])
            for name in names:
                set_peft_model_state_dict(model, self.tensors[name], adapter_name=name)
            model.set_adapter(active)
        with torch.no_grad():
            return model_output(model.eval()(**inputs))
