"""EVA (Explained Variance Adaptation): ``lora_A`` from the principal directions of each layer's inputs.

The procedure, with the reference library's semantics (so both give the same state dict on the
same data):

1. Hook every target linear layer and run one batch to find layers that see identical inputs
   (``q_proj``/``k_proj``/``v_proj`` usually do); only one layer of each such group is tracked.
2. Each tracked layer keeps an incremental PCA (:class:`~peft_lora.incremental_pca.IncrementalPCA`)
   of its inputs with ``round(r * rho)`` components, updated batch after batch (cycling through
   the dataloader). A component has converged when its cosine similarity with the previous
   step's is at least ``tau``; a layer stops being hooked once the components it needs converge.
3. After each step the rank budget (``r`` per layer, so the sum is unchanged) is given to the
   components with the largest explained-variance ratios over all layers, at most
   ``round(r * rho)`` per layer.
4. :func:`initialize_lora_eva_weights` writes each layer's top components into ``lora_A``
   (``B`` stays zero, so the output is unchanged), resizes layers whose rank changed (scaling
   ``lora_alpha`` along with ``adjust_scaling_factors``), unwraps layers left with rank 0, and
   records the new ranks in ``rank_pattern``/``alpha_pattern`` (and ``target_modules``), so the
   saved ``adapter_config.json`` describes the adapter in either library.
"""

from __future__ import annotations

import copy
import hashlib
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from itertools import cycle
from typing import Any

import torch
import torch.distributed as dist
from peft_core.targeting import expand_all_linear, match_target, pattern_value
from torch import nn

from peft_lora.incremental_pca import IncrementalPCA
from peft_lora.init_configs import EvaConfig, init_options

__all__ = [
    "forward_fn_dict",
    "get_eva_state_dict",
    "initialize_lora_eva_weights",
    "prepare_layer_inputs_fn_language_modeling",
    "prepare_model_inputs_fn_language_modeling",
]

_RHO_CEILING = 1000
"""Above this rho, the largest rank any layer could use bounds it (as in the reference)."""

_CONDENSE_TARGETS_FROM = 20
"""From this many target modules on, the saved target_modules is condensed to name suffixes."""

_PEFT_PREFIX = "base_model.model."


# ---------------------------------------------------------------------- default input handling
def forward_fn_dict(model: nn.Module, inputs: Any) -> Any:
    """Run ``model(**inputs)`` (the default ``forward_fn``)."""
    return model(**inputs)


def prepare_model_inputs_fn_language_modeling(model_input: Any, peft_config: Any) -> torch.Tensor:
    """The (batch, position) indices of the tokens to use: attention mask, and labels != label_mask_value."""
    if not isinstance(model_input, Mapping):
        raise TypeError(
            "prepare_model_inputs_fn_language_modeling expects dict batches (input_ids, attention_mask, labels); "
            f"got {type(model_input).__name__}. Pass prepare_model_inputs_fn=None or your own function."
        )
    mask = model_input.get("attention_mask", torch.ones_like(model_input["input_ids"])).bool()
    options = init_options("eva_config", peft_config.eva_config)
    if options.use_label_mask and "labels" in model_input:
        mask = mask & (model_input["labels"] != options.label_mask_value)
    return mask.nonzero()


def _first_tensor(layer_input: Any, layer_name: str) -> torch.Tensor:
    if isinstance(layer_input, torch.Tensor):
        return layer_input
    if isinstance(layer_input, (tuple, list)):
        return layer_input[0]
    raise TypeError(
        f"EVA cannot read the input of {layer_name!r} (a {type(layer_input).__name__}); pass a "
        "prepare_layer_inputs_fn that returns a 2-d tensor."
    )


def prepare_layer_inputs_fn_language_modeling(
    layer_input: Any, model_input: torch.Tensor, layer_name: str
) -> torch.Tensor:
    """The rows of the layer input at the token positions selected by the model-input function."""
    return _first_tensor(layer_input, layer_name)[model_input.T.unbind()]


def _default_layer_inputs(layer_input: Any, model_input: Any, layer_name: str) -> torch.Tensor:
    x = _first_tensor(layer_input, layer_name)
    return x.reshape(-1, x.shape[-1]) if x.dim() > 2 else x


# ---------------------------------------------------------------------- hooks
class _InputHook:
    """A forward hook that turns a layer's input into the 2-d rows EVA looks at."""

    def __init__(self, name: str, prepare: Callable | None, gather_distributed: bool) -> None:
        self.name = name
        self.prepare = prepare if prepare is not None else _default_layer_inputs
        self.gather_distributed = gather_distributed
        self.model_input: Any = None

    def rows(self, layer_input: Any) -> torch.Tensor:
        rows = self.prepare(layer_input, self.model_input, self.name)
        if self.gather_distributed and dist.is_available() and dist.is_initialized():
            rows = _gather_rows(rows)
        return rows


def _gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """The rows of every rank, concatenated (ranks may hold different numbers of rows)."""
    world = dist.get_world_size()
    size = torch.tensor([rows.shape[0]], device=rows.device)
    sizes = torch.empty(world, dtype=size.dtype, device=rows.device)
    dist.all_gather_into_tensor(sizes, size)
    sizes_list = sizes.tolist()
    padded = rows.new_zeros((max(sizes_list), *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([g[:n] for g, n in zip(gathered, sizes_list)], dim=0)


class _FingerprintHook(_InputHook):
    """Records a digest of the layer's input, to find layers that receive identical inputs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fingerprint: str | None = None

    @torch.no_grad()
    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        rows = self.rows(inputs).detach().cpu().contiguous()
        digest = hashlib.sha1(str((tuple(rows.shape), rows.dtype)).encode())
        digest.update(rows.view(-1).view(torch.uint8).numpy().tobytes())
        self.fingerprint = digest.hexdigest()


class _PCAHook(_InputHook):
    """Updates the layer's incremental PCA with each input, and which components have converged."""

    def __init__(self, n_components: int, tau: float, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.n_components = n_components
        self.tau = tau
        self.pca = IncrementalPCA(n_components)
        self.converged = torch.zeros(n_components, dtype=torch.bool)

    @torch.no_grad()
    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        rows = self.rows(inputs)
        if rows.shape[0] < self.n_components:
            warnings.warn(
                f"EVA: skipping a batch for {self.name!r}: {rows.shape[0]} row(s), fewer than the "
                f"{self.n_components} components it needs.",
                UserWarning,
                stacklevel=2,
            )
            return
        previous = self.pca.components_.clone() if self.pca.fitted else None
        self.pca.partial_fit(rows.to(torch.float32))
        if previous is None:
            return
        similarity = torch.nn.functional.cosine_similarity(self.pca.components_, previous)
        self.converged = similarity >= self.tau


# ---------------------------------------------------------------------- the state dict
def _single_device(model: nn.Module) -> torch.device | None:
    devices = {p.device for p in model.parameters() if p.device.type != "meta"}
    if len(devices) > 1:
        warnings.warn(
            f"EVA: the model is spread over {sorted(map(str, devices))}; inputs are not moved.", stacklevel=3
        )
        return None
    return next(iter(devices), None)


def _to_device(inputs: Any, device: torch.device | None) -> Any:
    if device is None:
        return inputs
    if hasattr(inputs, "to"):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return type(inputs)({k: _to_device(v, device) for k, v in inputs.items()})
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to_device(v, device) for v in inputs)
    warnings.warn(f"EVA: cannot move an input of type {type(inputs).__name__} to {device}.", stacklevel=3)
    return inputs


def _hook_inputs(inputs: Any, prepare_model_inputs_fn: Callable | None, peft_config: Any) -> Any:
    if prepare_model_inputs_fn is None:
        return copy.deepcopy(inputs)
    return prepare_model_inputs_fn(inputs, peft_config)


def _distribute_ranks(
    pcas: dict[str, IncrementalPCA],
    hook_of: dict[str, str],
    duplicates: dict[str, str],
    budget: int,
    max_components: dict[str, int],
) -> dict[str, int]:
    """Give the ``budget`` largest explained-variance ratios (over all layers) their layer's ranks."""
    ratios = {name: pca.explained_variance_ratio_[: max_components[name]] for name, pca in pcas.items()}
    owners = [layer for layer, hooked in hook_of.items() for _ in ratios[hooked]]
    values = torch.stack([value for hooked in hook_of.values() for value in ratios[hooked]])
    ranked = values.argsort(descending=True)
    chosen = Counter(owners[i] for i in ranked[:budget].tolist())
    ranks = {layer: chosen.get(layer, 0) for layer in hook_of}
    # A layer that shares its inputs with a tracked one: the tracked one gets the larger rank,
    # since the shared components are read from its PCA.
    for layer, hooked in duplicates.items():
        if ranks[hooked] < ranks[layer]:
            ranks[hooked], ranks[layer] = ranks[layer], ranks[hooked]
    return ranks


def _collect_eva_state_dict(
    model: nn.Module,
    dataloader: Iterable,
    peft_config: Any,
    is_target: Callable[[str, nn.Module], bool],
    forward_fn: Callable | None,
    prepare_model_inputs_fn: Callable | None,
    prepare_layer_inputs_fn: Callable | Mapping[str, Callable] | None,
    gather_distributed_inputs: bool,
    show_progress_bar: bool,
) -> dict[str, torch.Tensor]:
    if hasattr(dataloader, "__len__") and len(dataloader) == 0:
        raise ValueError("EVA needs data: the dataloader is empty.")
    if dist.is_available() and dist.is_initialized() and gather_distributed_inputs:
        warnings.warn(
            "torch.distributed is initialised and gather_distributed_inputs=True: EVA gathers the layer inputs of all "
            "ranks, so every rank must see different data.",
            UserWarning,
            stacklevel=3,
        )
    options: EvaConfig = init_options("eva_config", peft_config.eva_config)
    forward_fn = forward_fn or forward_fn_dict
    rho = options.rho
    if rho > _RHO_CEILING:
        rho = min(rho, max(max(p.shape) for p in model.parameters()) // peft_config.r)

    was_training = model.training
    device = _single_device(model)
    model.eval()
    try:
        first = _to_device(next(iter(dataloader)), device)
        first_model_input = _hook_inputs(first, prepare_model_inputs_fn, peft_config)
        per_layer = dict(prepare_layer_inputs_fn) if isinstance(prepare_layer_inputs_fn, Mapping) else None

        # Step 1: one batch to find the layers that see identical inputs.
        fingerprints: dict[str, tuple[_FingerprintHook, Any]] = {}
        max_components: dict[str, int] = {}
        budget = 0
        for name, module in model.named_modules():
            if not is_target(name, module):
                continue
            prepare = per_layer.pop(name, None) if per_layer is not None else prepare_layer_inputs_fn
            hook = _FingerprintHook(name, prepare, gather_distributed_inputs)
            hook.model_input = first_model_input
            fingerprints[name] = (hook, module.register_forward_hook(hook))
            rank = pattern_value(peft_config.rank_pattern, name, peft_config.r)
            max_components[name] = round(rank * rho)
            budget += rank
        if per_layer:
            for _, handle in fingerprints.values():
                handle.remove()
            raise ValueError(
                f"prepare_layer_inputs_fn names module(s) that are not EVA targets of the model: {sorted(per_layer)}."
            )
        if not fingerprints:
            raise ValueError("EVA found no target layer (nn.Linear / Conv1D LoRA layers) in the model.")
        try:
            forward_fn(model, first)
        finally:
            for _, handle in fingerprints.values():
                handle.remove()
        groups: dict[str, list[str]] = {}
        for name, (hook, _) in fingerprints.items():
            groups.setdefault(hook.fingerprint or name, []).append(name)
        duplicates = {other: names[0] for names in groups.values() if len(names) > 1 for other in names[1:]}
        for names in groups.values():
            largest = max(max_components[n] for n in names)
            for n in names:
                max_components[n] = largest

        # Step 2: incremental PCA on the tracked layers until every needed component converged.
        hooks: dict[str, _PCAHook] = {}
        handles: dict[str, Any] = {}
        for name, (fingerprint, _) in fingerprints.items():
            if name in duplicates:
                continue
            hooks[name] = _PCAHook(
                max_components[name], options.tau, name, fingerprint.prepare, gather_distributed_inputs
            )
            handles[name] = model.get_submodule(name).register_forward_hook(hooks[name])
        hook_of = {**{name: name for name in hooks}, **duplicates}
        try:
            ranks = _run_until_converged(
                model,
                dataloader,
                device,
                hooks,
                handles,
                hook_of,
                duplicates,
                budget,
                max_components,
                forward_fn,
                prepare_model_inputs_fn,
                peft_config,
                show_progress_bar,
            )
        finally:
            for handle in handles.values():
                if handle is not None:
                    handle.remove()
    finally:
        model.train(was_training)

    state: dict[str, torch.Tensor] = {}
    for name, rank in ranks.items():
        hook = hooks[hook_of[name]]
        if not bool(hook.converged[:rank].all()):
            raise RuntimeError(
                f"EVA: {name!r} was given rank {rank} before its components converged (a bug)."
            )
        components = hook.pca.components_[:rank]
        if options.whiten:
            components = components / hook.pca.singular_values_[:rank].sqrt().reshape(-1, 1)
        state[name] = components if device is None else components.to(device)
    return state


def _run_until_converged(
    model: nn.Module,
    dataloader: Iterable,
    device: torch.device | None,
    hooks: dict[str, _PCAHook],
    handles: dict[str, Any],
    hook_of: dict[str, str],
    duplicates: dict[str, str],
    budget: int,
    max_components: dict[str, int],
    forward_fn: Callable,
    prepare_model_inputs_fn: Callable | None,
    peft_config: Any,
    show_progress_bar: bool,
) -> dict[str, int]:
    batches: Iterable = cycle(dataloader)
    bar = None
    if show_progress_bar and (not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0):
        try:
            from tqdm import tqdm
        except ImportError:  # the progress bar is optional
            pass
        else:
            batches = bar = tqdm(batches, position=0, leave=False)
    done = dict.fromkeys(hooks, False)
    ranks = dict(max_components)
    try:
        for inputs in batches:
            inputs = _to_device(inputs, device)
            model_input = _hook_inputs(inputs, prepare_model_inputs_fn, peft_config)
            for name, hook in hooks.items():
                converged = bool(hook.converged[: ranks[name]].all())
                if not done[name] and converged:
                    handles[name].remove()
                    handles[name] = None
                    done[name] = True
                    continue
                if done[name] and not converged:
                    # A larger share of the budget needs components that have not converged yet.
                    handles[name] = model.get_submodule(name).register_forward_hook(hook)
                    done[name] = False
                hook.model_input = model_input
            if bar is not None:
                finished = list(done.values()) + [done[v] for v in duplicates.values()]
                bar.set_description(f"{sum(finished)}/{len(finished)} layers have converged")
            if all(done.values()):
                break
            forward_fn(model, inputs)
            if not all(hook.pca.fitted for hook in hooks.values()):
                continue  # some layer skipped its batch: no ratios to compare yet
            pcas = {name: hook.pca for name, hook in hooks.items()}
            ranks = _distribute_ranks(pcas, hook_of, duplicates, budget, max_components)
    finally:
        if bar is not None:
            bar.close()
    return ranks


def _is_eva_layer(module: nn.Module) -> bool:
    from peft_lora.layer import Linear

    return isinstance(module, Linear)


def _is_plain_linear(module: nn.Module) -> bool:
    from peft_lora.layer import is_transformers_conv1d

    return isinstance(module, nn.Linear) or is_transformers_conv1d(module)


@torch.no_grad()
def get_eva_state_dict(
    model: nn.Module,
    dataloader: Iterable,
    peft_config: Any = None,
    forward_fn: Callable | None = forward_fn_dict,
    prepare_model_inputs_fn: Callable | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Callable
    | Mapping[str, Callable]
    | None = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> dict[str, torch.Tensor]:
    """The EVA components of every target layer: ``{module name: tensor (rank, in_features)}``.

    ``model`` is a PeftModel (its LoRA linear layers are the targets, run with adapters disabled)
    or a plain model together with ``peft_config`` (its ``nn.Linear``/``Conv1D`` layers matched
    by ``target_modules``; all of them when that is None). ``forward_fn(model, batch)`` runs a
    batch; ``prepare_model_inputs_fn(batch, peft_config)`` turns a batch into what
    ``prepare_layer_inputs_fn(layer_input, model_input, layer_name)`` (one function, or one per
    module name) needs to return the 2-d rows of a layer's input. The defaults are for language
    modelling: the rows of the tokens kept by the attention mask (and labels, with
    ``use_label_mask``). The ranks sum to ``r`` per target layer. Pass the result to
    :func:`initialize_lora_eva_weights` (``eva_state_dict=``), e.g. after computing it once.
    """
    is_peft_model = hasattr(model, "peft_config")
    if peft_config is None:
        if not is_peft_model:
            raise ValueError("get_eva_state_dict needs peft_config when the model is not a PeftModel.")
        peft_config = model.peft_config[adapter_name]
    if is_peft_model:
        context = model.disable_adapter()

        def is_target(name: str, module: nn.Module) -> bool:
            return _is_eva_layer(module)
    else:
        context = nullcontext()
        config = peft_config
        if peft_config.target_modules == "all-linear":
            config = peft_config.copy(target_modules=expand_all_linear(model))

        def is_target(name: str, module: nn.Module) -> bool:
            if not _is_plain_linear(module):
                return False
            return config.target_modules is None or match_target(config, name)

    with context:
        return _collect_eva_state_dict(
            model,
            dataloader,
            peft_config,
            is_target,
            forward_fn,
            prepare_model_inputs_fn,
            prepare_layer_inputs_fn,
            gather_distributed_inputs,
            show_progress_bar,
        )


# ---------------------------------------------------------------------- loading into the adapter
def _condensed_targets(targets: list[str], others: Iterable[str]) -> list[str]:
    """Short name suffixes that select exactly ``targets`` among all module names (as the reference writes)."""

    def suffixes(name: str) -> list[str]:
        parts = name.split(".")
        return [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]

    taken = {s for other in others for s in suffixes(other)}
    chosen: set[str] = set()
    for name, candidates in sorted(((t, suffixes(t)) for t in set(targets)), key=lambda item: item[1]):
        if any(name == c or name.endswith("." + c) for c in chosen):
            continue
        for candidate in candidates:
            if candidate not in taken and candidate not in chosen:
                chosen.add(candidate)
                break
    return sorted(chosen)


def _load_eva_state_dict(
    model: nn.Module, eva_state_dict: dict[str, torch.Tensor], adapter_name: str
) -> None:
    config = model.peft_config[adapter_name]
    options: EvaConfig = init_options("eva_config", config.eva_config)
    remaining = dict(eva_state_dict)
    targets: list[str] = []
    not_initialised: list[str] = []
    others: list[str] = []
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for name, module in list(model.named_modules()):
        short = name.replace(_PEFT_PREFIX, "")
        if not _is_lora_layer(module):
            others.append(short)
            continue
        r = pattern_value(config.rank_pattern, name, config.r)
        alpha = pattern_value(config.alpha_pattern, name, config.lora_alpha)
        components = remaining.pop(name, None)
        if components is None:
            not_initialised.append(short)
            new_rank = r
        else:
            new_rank = components.shape[0]
            if new_rank == 0:
                _drop_adapter(model, name, module, adapter_name)
                continue
            if new_rank != r and options.adjust_scaling_factors:
                alpha *= new_rank / r
            weight = module.lora_A[adapter_name].weight
            if new_rank != r or weight.device.type == "meta":
                single = config.copy(r=new_rank, lora_alpha=alpha, rank_pattern={}, alpha_pattern={})
                module.update_layer(adapter_name, single, key=short)
            module.lora_A[adapter_name].weight.copy_(components)
            targets.append(short)
        if new_rank != config.r:
            rank_pattern[short] = new_rank
        if alpha != config.lora_alpha:
            alpha_pattern[short] = alpha
    targets += not_initialised
    if len(targets) >= _CONDENSE_TARGETS_FROM:
        targets = _condensed_targets(targets, others)
    config.target_modules = targets
    config.rank_pattern = rank_pattern
    config.alpha_pattern = alpha_pattern
    if not_initialised:
        warnings.warn(
            f"EVA: no components for {not_initialised}, which keep their default init (EVA covers LoRA linear "
            "layers only).",
            UserWarning,
            stacklevel=3,
        )


def _is_lora_layer(module: nn.Module) -> bool:
    from peft_lora.layer import LoraLayer

    return isinstance(module, LoraLayer)


def _drop_adapter(model: nn.Module, name: str, module: nn.Module, adapter_name: str) -> None:
    """Rank 0: the layer loses the adapter (and is unwrapped when it held nothing else)."""
    if [n for n in module.adapter_names if n != adapter_name]:
        module.delete_adapter(adapter_name)
        return
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module.get_base_layer())


@torch.no_grad()
def initialize_lora_eva_weights(
    model: nn.Module,
    dataloader: Iterable | None = None,
    eva_state_dict: dict[str, torch.Tensor] | None = None,
    forward_fn: Callable | None = forward_fn_dict,
    prepare_model_inputs_fn: Callable | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Callable
    | Mapping[str, Callable]
    | None = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> nn.Module:
    """Initialise ``adapter_name`` of the PeftModel ``model`` with EVA (in place; returns ``model``).

    Computes the components with :func:`get_eva_state_dict` from ``dataloader`` (same arguments),
    unless ``eva_state_dict`` is given. The adapter must have been created with
    ``init_lora_weights="eva"``, and be the only active one.

    >>> import torch
    >>> from torch import nn
    >>> from peft_core import get_peft_model
    >>> from peft_lora import LoraConfig, initialize_lora_eva_weights
    >>> base = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> config = LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights="eva", eva_config={"rho": 1.0})
    >>> model = get_peft_model(base, config)
    >>> batches = [torch.randn(32, 16) for _ in range(4)]
    >>> _ = initialize_lora_eva_weights(
    ...     model, batches, forward_fn=lambda m, x: m(x), prepare_model_inputs_fn=None,
    ...     prepare_layer_inputs_fn=None, show_progress_bar=False)
    >>> sorted(model.peft_config["default"].target_modules)
    ['0', '2']
    """
    if not hasattr(model, "peft_config"):
        raise ValueError("initialize_lora_eva_weights needs a PeftModel (from get_peft_model).")
    if len(model.active_adapters) > 1:
        raise ValueError(
            f"initialize_lora_eva_weights works with one active adapter, got {model.active_adapters}; "
            "set_adapter() to the EVA adapter first."
        )
    init = model.peft_config[adapter_name].init_lora_weights
    if init != "eva":
        raise ValueError(
            f"initialize_lora_eva_weights needs an adapter created with init_lora_weights='eva', got {init!r}."
        )
    if eva_state_dict is None:
        if dataloader is None:
            raise ValueError(
                "initialize_lora_eva_weights needs a dataloader, or a precomputed eva_state_dict."
            )
        eva_state_dict = get_eva_state_dict(
            model,
            dataloader,
            forward_fn=forward_fn,
            prepare_model_inputs_fn=prepare_model_inputs_fn,
            prepare_layer_inputs_fn=prepare_layer_inputs_fn,
            adapter_name=adapter_name,
            gather_distributed_inputs=gather_distributed_inputs,
            show_progress_bar=show_progress_bar,
        )
    _load_eva_state_dict(model, eva_state_dict, adapter_name)
    return model
