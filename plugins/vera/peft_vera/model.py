"""``VeraModel``: the core's adapter model, plus the projections all VeRA layers share.

The model owns ``vera_A`` and ``vera_B`` (one :class:`~peft_vera.projections.BufferDict` each,
keyed by adapter name) and hands them to every VeRA layer. As in the reference library:

* the first adapter's projections are drawn from its ``projection_prng_key``, sized for the
  largest targeted layer; later adapters use the same matrices (a copy, so loading one adapter's
  checkpoint never changes another's), and must agree on ``projection_prng_key`` and
  ``save_projection``;
* with ``save_projection=True`` the projections are saved under the model-level checkpoint keys
  ``base_model.vera_A`` / ``base_model.vera_B`` (see :meth:`VeraModel.adapter_state_items`);
  otherwise they are regenerated from the key when an adapter is loaded.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch
from peft_core.config import PeftConfig
from peft_core.errors import ConfigError, TargetModulesError
from peft_core.tuner import AdapterModel

from peft_vera.layer import VeraLayer
from peft_vera.projections import BufferDict, generate_projections

__all__ = ["VeraModel"]

_PROJECTIONS = ("vera_A", "vera_B")


class VeraModel(AdapterModel):
    """Injects VeRA layers and manages their shared projections; see :class:`peft_core.tuner.AdapterModel`."""

    # ------------------------------------------------------------------ config
    def _validate_new_adapter(self, config: PeftConfig) -> None:
        for name, existing in self.peft_config.items():
            if existing.projection_prng_key != config.projection_prng_key:
                raise ConfigError(
                    f"projection_prng_key={config.projection_prng_key!r}, but adapter {name!r} uses "
                    f"{existing.projection_prng_key!r}; all VeRA adapters of a model share one pair of projections, so "
                    "they must use the same projection_prng_key."
                )
            if existing.save_projection != config.save_projection:
                raise ConfigError(
                    f"save_projection={config.save_projection!r}, but adapter {name!r} uses "
                    f"{existing.save_projection!r}; the shared projections are saved for all VeRA adapters of a model "
                    "or for none."
                )
        with_bias = [name for name, c in self.peft_config.items() if c.bias != "none"]
        if with_bias and config.bias != "none":
            raise ConfigError(
                f"Adapter {with_bias[0]!r} already trains biases (bias={self.peft_config[with_bias[0]].bias!r}); only "
                "one VeRA adapter per model may use bias other than 'none'. Set bias='none' for the new one."
            )

    # ------------------------------------------------------------------ injection
    def inject_adapter(self, adapter_name: str, config: PeftConfig, *, loading: bool = False) -> None:
        super().inject_adapter(adapter_name, config, loading=loading)
        try:
            self._share_projections(adapter_name)
        except BaseException:
            self._remove_adapter_everywhere(adapter_name)
            self.peft_config.pop(adapter_name, None)
            raise

    def _vera_layers(self) -> list[tuple[str, VeraLayer]]:
        return [(key, layer) for key, layer in self.named_adapter_layers() if isinstance(layer, VeraLayer)]

    def _share_projections(self, adapter_name: str) -> None:
        config = self.peft_config[adapter_name]
        layers = [(key, layer) for key, layer in self._vera_layers() if adapter_name in layer.vera_lambda_d]
        if not layers:
            raise TargetModulesError(
                f"No VeRA layer was created for adapter {adapter_name!r}; VeRA adapts nn.Linear and transformers' "
                "Conv1D layers. Check target_modules."
            )
        if "vera_A" not in self._modules:
            self.vera_A = BufferDict(persistent=config.save_projection)
            self.vera_B = BufferDict(persistent=config.save_projection)
        elif not len(self.vera_A):  # every earlier adapter was deleted: this one decides afresh
            self.vera_A.set_persistent(config.save_projection)
            self.vera_B.set_persistent(config.save_projection)
        others = list(self.vera_A.keys())
        if others:
            vera_A, vera_B = self.vera_A[others[0]].clone(), self.vera_B[others[0]].clone()
        else:
            in_features = max(layer.in_features for _, layer in layers)
            out_features = max(layer.out_features for _, layer in layers)
            generated = generate_projections(config.r, in_features, out_features, config.projection_prng_key)
            vera_A, vera_B = (self._place(t, [layer for _, layer in layers]) for t in generated)
        self.vera_A[adapter_name] = vera_A
        self.vera_B[adapter_name] = vera_B
        for _, layer in self._vera_layers():
            layer.attach_projections(self.vera_A, self.vera_B)
        for key, layer in layers:
            layer.check_projections(adapter_name, key)
        if not config.save_projection:
            warnings.warn(
                f"VeRA adapter {adapter_name!r} has save_projection=False: its projections are not saved, and loading "
                f"regenerates them from projection_prng_key={config.projection_prng_key}, which relies on torch drawing "
                "the same random numbers on the loading machine. Set save_projection=True to store them.",
                UserWarning,
                stacklevel=4,
            )

    def _place(self, tensor: torch.Tensor, layers: list[VeraLayer]) -> torch.Tensor:
        """Give a fresh projection the device and dtype the reference gives it.

        There, every layer moves the shared tensor to its base weight's device and float dtype in
        turn, and half-precision adapter tensors are then upcast to float32 (autocast_adapter_dtype);
        the values are rounded on the way exactly as here.
        """
        for layer in layers:
            weight = getattr(layer.get_base_layer(), "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.device.type == "meta":
                continue
            dtype = weight.dtype if weight.dtype.is_floating_point else None
            tensor = tensor.to(weight.device, dtype=dtype)
        if self.autocast_adapter_dtype and tensor.dtype in (torch.float16, torch.bfloat16):
            tensor = tensor.float()
        return tensor

    # ------------------------------------------------------------------ adapters
    def _drop_projections(self, adapter_name: str) -> None:
        for attr in _PROJECTIONS:
            container = self._modules.get(attr)
            if isinstance(container, BufferDict) and adapter_name in container:
                del container[adapter_name]

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._drop_projections(adapter_name)

    def _remove_adapter_everywhere(self, adapter_name: str) -> None:
        super()._remove_adapter_everywhere(adapter_name)
        self._drop_projections(adapter_name)

    # ------------------------------------------------------------------ serialization
    def adapter_state_items(self, adapter_name: str) -> Iterator[tuple[str, str, torch.Tensor]]:
        """``(model_suffix, checkpoint_suffix, tensor)`` of the model-level tensors of ``adapter_name``.

        Suffixes are relative to this adapter model's own dotted name, like
        :meth:`peft_core.layer.AdapterLayer.adapter_state_items`: under a ``PeftModel`` the
        projections are ``base_model.vera_A.<adapter>`` in the model and ``base_model.vera_A`` in
        the checkpoint, the reference library's keys. Nothing when ``save_projection`` is False.
        """
        config = self.peft_config.get(adapter_name)
        if config is None or not config.save_projection:
            return
        for attr in _PROJECTIONS:
            container = self._modules.get(attr)
            if isinstance(container, BufferDict) and adapter_name in container:
                yield f"{attr}.{adapter_name}", attr, container[adapter_name]
