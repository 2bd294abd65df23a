"""CorDA: LoRA factors from the covariance-weighted decomposition of the base weight.

For a target layer with weight ``W`` (out, in) and the covariance ``C`` (in, in) of its inputs on
sample data, CorDA takes the SVD ``W C = U S V^T`` and sets ``W = U S (V^T C^-1)``: the singular
directions are ordered by how much they matter on that data. ``"ipm"`` (instruction-previewed)
puts the top ``r`` components into ``B @ A`` (fast adaptation to the sampled task), ``"kpm"``
(knowledge-preserved) the bottom ``r`` (leaving the components the data relies on intact). The
base weight keeps the residual, so the adapted output is unchanged right after the init.

Two steps, as in the reference library: :func:`preprocess_corda` on the base model (runs the
model on sample data and stores the decomposition on each target layer as ``module.eigens``),
then ``get_peft_model`` with ``init_lora_weights="corda"``. To share the trained adapter as a
plain LoRA for the original base, save the adapter right after the init (with
``init_lora_weights=True`` in its config) and pass that directory as
``save_pretrained(..., path_initial_model_for_weight_conversion=...)``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from attrs import define
from peft_core.errors import ConfigError
from peft_core.targeting import expand_all_linear, match_target, pattern_value
from torch import nn

from peft_lora.init import require_float_weight
from peft_lora.init_configs import CordaConfig, init_options

__all__ = ["CordaEigens", "corda_init", "preprocess_corda"]

_INVERSE_TOLERANCE = 0.05
"""How far ``C_damped @ inverse`` may be from the identity (Frobenius) before the damping doubles."""


@define
class CordaEigens:
    """The cropped decomposition of one layer: ``U_WC`` (out, r), ``S_WC`` (r,), ``V_WC`` (in, r)."""

    S_WC: torch.Tensor
    U_WC: torch.Tensor
    V_WC: torch.Tensor


def _is_conv1d(module: nn.Module) -> bool:
    from peft_lora.layer import is_transformers_conv1d

    return is_transformers_conv1d(module)


def _targets(model: nn.Module, lora_config: Any) -> Iterator[tuple[str, nn.Module]]:
    """The (name, module) pairs CorDA decomposes: targeted ``nn.Linear`` / transformers ``Conv1D``."""
    config = lora_config
    if lora_config.target_modules == "all-linear":
        config = lora_config.copy(target_modules=expand_all_linear(model))
    elif lora_config.target_modules is None:
        raise ConfigError(
            "preprocess_corda needs lora_config.target_modules (a list of module names, a regex or 'all-linear')."
        )
    for name, module in model.named_modules():
        if name and match_target(config, name) and (isinstance(module, nn.Linear) or _is_conv1d(module)):
            yield name, module


def _weight_out_in(module: nn.Module) -> torch.Tensor:
    weight = module.weight.detach().float()
    return weight.T if _is_conv1d(module) else weight  # Conv1D stores (in, out)


def _model_device(model: nn.Module) -> torch.device:
    return next(iter(model.parameters())).device


@torch.no_grad()
def preprocess_corda(
    model: nn.Module,
    lora_config: Any,
    run_model: Callable[[], None] | None = None,
    hooked_model: nn.Module | None = None,
) -> None:
    """Store the CorDA decomposition on every target layer of ``model`` (as ``module.eigens``).

    ``run_model`` runs the model on sample data (it is called once, with the covariance hooks in
    place); it may be None when ``corda_config.cache_file`` or ``covariance_file`` already holds
    the result. ``hooked_model`` is the model to hook if it is not ``model`` itself (its target
    layers must have the same names). Call it before ``get_peft_model(model, lora_config)``.

    >>> import torch
    >>> from torch import nn
    >>> from peft_lora import LoraConfig, preprocess_corda
    >>> model = nn.Sequential(nn.Linear(8, 8))
    >>> config = LoraConfig(r=2, target_modules=["0"], init_lora_weights="corda")
    >>> preprocess_corda(model, config, run_model=lambda: model(torch.randn(32, 8)))
    >>> tuple(model[0].eigens.U_WC.shape)
    (8, 2)
    """
    options: CordaConfig = init_options("corda_config", lora_config.corda_config)
    cache_file = options.cache_file
    if cache_file is not None and os.path.exists(cache_file) and os.path.getsize(cache_file) > 0:
        cache = torch.load(cache_file, map_location=_model_device(model), weights_only=True)
        for name, module in _targets(model, lora_config):
            module.eigens = CordaEigens(
                *(cache[f"{name}.eigens.{part}"] for part in ("S_WC", "U_WC", "V_WC"))
            )
        return

    covariances = _input_covariances(model, lora_config, options, run_model, hooked_model)
    targets = list(_targets(model, lora_config))
    if options.verbose:
        print(f"CorDA: decomposing {len(targets)} layer(s) ({options.corda_method})")
    for name, module in targets:
        rank = pattern_value(lora_config.rank_pattern, name, lora_config.r)
        full = _decompose(_weight_out_in(module), covariances[name])
        module.eigens = _crop(full, rank, options.corda_method, name)
        if not options.prune_temporary_fields:
            module.covariance_matrix = covariances[name]
        if options.verbose:
            print(f"CorDA: {name} done")

    if cache_file is not None:
        cache = {}
        for name, module in targets:
            for part in ("S_WC", "U_WC", "V_WC"):
                cache[f"{name}.eigens.{part}"] = getattr(module.eigens, part)
        _save(cache, cache_file)


def _save(tensors: dict[str, torch.Tensor], path: str) -> None:
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    torch.save(tensors, path)


def _input_covariances(
    model: nn.Module,
    lora_config: Any,
    options: CordaConfig,
    run_model: Callable[[], None] | None,
    hooked_model: nn.Module | None,
) -> dict[str, torch.Tensor]:
    """The mean over forward calls of ``X^T X`` (each call's inputs divided by their largest value)."""
    covariance_file = options.covariance_file
    names = [name for name, _ in _targets(model, lora_config)]
    if (
        covariance_file is not None
        and os.path.exists(covariance_file)
        and os.path.getsize(covariance_file) > 0
    ):
        stored = torch.load(covariance_file, map_location=_model_device(model), weights_only=True)
        return {name: stored[name] for name in names}
    if run_model is None:
        raise ValueError(
            "preprocess_corda needs run_model (a callable that runs the model on sample data), unless "
            "corda_config.cache_file or corda_config.covariance_file already holds the result."
        )
    hooked = model if hooked_model is None else hooked_model
    hooked.eval()
    sums: dict[str, Any] = {}
    counts: dict[str, int] = {}

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            x = inputs[0].detach()
            x = x.reshape(-1, x.shape[-1])
            if not options.use_float16_for_covariance:
                x = x.float()
            # As in the reference: each call is normalised by (the magnitude of) its largest value.
            x = x / torch.max(x).abs()
            if not torch.isfinite(x).all():
                raise ValueError(f"CorDA: the inputs of {name!r} contain NaN or inf; check the sample data.")
            covariance = x.T @ x
            if not torch.isfinite(covariance).all():
                raise ValueError(
                    f"CorDA: the input covariance of {name!r} overflowed; set use_float16_for_covariance=False."
                )
            sums[name] = covariance if name not in sums else sums[name] + covariance
            counts[name] = counts.get(name, 0) + 1

        return hook

    handles = [
        module.register_forward_hook(make_hook(name)) for name, module in _targets(hooked, lora_config)
    ]
    try:
        run_model()
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in names if name not in sums]
    if missing:
        raise ValueError(
            f"CorDA: run_model never ran the target layer(s) {missing[:5]}; run the model on sample data that "
            "reaches every target module (or leave the others out of target_modules)."
        )
    covariances = {name: sums[name] / counts[name] for name in names}
    if covariance_file is not None:
        _save(covariances, covariance_file)
    return covariances


def _decompose(weight: torch.Tensor, covariance: torch.Tensor) -> CordaEigens:
    """The full decomposition ``W = U S (C^-1 V)^T`` with ``C`` damped until it inverts well."""
    covariance = covariance.float().to(weight.device)
    eye = torch.eye(covariance.shape[0], device=weight.device)
    damp = 0.01
    while True:
        damped = covariance + eye * (torch.diagonal(covariance).mean() * damp)
        inverse = torch.linalg.inv(damped)
        if torch.dist(damped @ inverse, eye).item() < _INVERSE_TOLERANCE:
            break
        damp *= 2
    U, S, Vh = torch.linalg.svd(weight @ damped, full_matrices=False)
    return CordaEigens(S_WC=S, U_WC=U, V_WC=(Vh @ inverse).T)


def _crop(eigens: CordaEigens, rank: int, method: str, name: str) -> CordaEigens:
    available = eigens.S_WC.shape[0]
    if rank > available:
        raise ConfigError(
            f"CorDA: the rank for {name!r} is {rank}, more than min(out, in) = {available} of its weight; lower r "
            "(or set rank_pattern for this module)."
        )
    # Copies, so that saving the cache does not write the whole uncropped storage.
    part = slice(None, rank) if method == "ipm" else slice(available - rank, None)
    return CordaEigens(
        S_WC=eigens.S_WC[part].clone(),
        U_WC=eigens.U_WC[:, part].clone(),
        V_WC=eigens.V_WC[:, part].clone(),
    )


@torch.no_grad()
def corda_init(
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    base_layer: nn.Module,
    *,
    r: int,
    scaling: float,
    fan_in_fan_out: bool,
    key: str = "",
) -> None:
    """``A = sqrt(S') V^T``, ``B = U sqrt(S')`` with ``S' = S / scaling``; the base keeps ``W - scaling B A``."""
    eigens = getattr(base_layer, "eigens", None)
    if eigens is None:
        raise ConfigError(
            f"init_lora_weights='corda' needs the decomposition of {key!r}, which is missing: call "
            "preprocess_corda(model, lora_config, run_model=...) before get_peft_model."
        )
    weight = base_layer.weight
    require_float_weight(weight, "corda")
    out_features, in_features = (weight.shape[1], weight.shape[0]) if fan_in_fan_out else weight.shape
    U, S, V = eigens.U_WC, eigens.S_WC, eigens.V_WC
    expected = {"U_WC": (out_features, r), "S_WC": (r,), "V_WC": (in_features, r)}
    for part, shape in expected.items():
        tensor = getattr(eigens, part)
        if tuple(tensor.shape) != shape:
            raise ConfigError(
                f"CorDA: {part} of {key!r} has shape {tuple(tensor.shape)}, expected {shape}; the config (r, "
                "rank_pattern) or the model differs from the one preprocess_corda (or its cache) used."
            )
        if not torch.isfinite(tensor).all():
            raise ValueError(f"CorDA: {part} of {key!r} contains NaN or inf.")
    device = weight.device
    root = (S.to(device, torch.float32) / scaling).sqrt()
    new_A = (V.to(device, torch.float32).T * root.unsqueeze(1)).contiguous()
    new_B = (U.to(device, torch.float32) * root).contiguous()
    lora_A.data = new_A
    lora_B.data = new_B
    delta = scaling * new_B @ new_A
    residual = weight.detach().float() - (delta.T if fan_in_fan_out else delta)
    weight.data = residual.to(weight.dtype).contiguous()
    del base_layer.eigens
