"""Finding adapter files in a local directory or a Hugging Face Hub repository."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["CONFIG_NAME", "HUB_KWARGS", "SAFETENSORS_WEIGHTS_NAME", "WEIGHTS_NAME", "resolve_file"]

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME = "adapter_model.bin"

# Keyword arguments of ``from_pretrained`` that are meant for the hub client.
HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "proxies")


def split_hub_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``kwargs`` into (hub client kwargs, the rest)."""
    hub = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs and kwargs[k] is not None}
    rest = {k: v for k, v in kwargs.items() if k not in HUB_KWARGS}
    return hub, rest


def resolve_file(
    path_or_id: str | os.PathLike[str],
    filename: str,
    *,
    subfolder: str | None = None,
    missing_ok: bool = False,
    **hub_kwargs: Any,
) -> str | None:
    """Local path of ``filename`` in a directory or hub repo; ``None`` if absent and ``missing_ok``.

    A local directory wins over a hub id of the same name. Hub downloads go through
    ``huggingface_hub`` and so honour its cache and ``HF_HUB_OFFLINE``.
    """
    path_or_id = os.fspath(path_or_id)
    local_dir = os.path.join(path_or_id, subfolder) if subfolder else path_or_id
    if os.path.isdir(local_dir):
        candidate = os.path.join(local_dir, filename)
        if os.path.isfile(candidate):
            return candidate
        if missing_ok:
            return None
        raise FileNotFoundError(f"{filename} not found in the local directory {local_dir!r}.")
    if os.path.isdir(path_or_id) and subfolder:
        if missing_ok:
            return None
        raise FileNotFoundError(f"Subfolder {subfolder!r} does not exist in {path_or_id!r}.")

    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            HFValidationError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )
    except ImportError as exc:  # pragma: no cover - huggingface_hub is a core dependency
        raise ImportError(
            f"{path_or_id!r} is not a local directory; loading from the Hub needs `pip install peft-core[hub]`."
        ) from exc
    try:
        return hf_hub_download(str(path_or_id), filename, subfolder=subfolder or None, **hub_kwargs)
    except EntryNotFoundError:
        if missing_ok:
            return None
        raise FileNotFoundError(f"{filename} not found in the Hub repository {path_or_id!r}.") from None
    except LocalEntryNotFoundError as exc:
        if missing_ok and _repo_cached(str(path_or_id), hub_kwargs):
            return None
        raise FileNotFoundError(
            f"{path_or_id!r} is neither a local directory nor a Hub repository available here "
            f"(offline or not in the cache): {exc}"
        ) from None
    except HFValidationError:
        raise FileNotFoundError(
            f"{path_or_id!r} is neither an existing local directory nor a valid Hub repository id."
        ) from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"{path_or_id!r} is neither a local directory nor an accessible Hub repository."
        ) from None


def _repo_cached(repo_id: str, hub_kwargs: dict[str, Any]) -> bool:
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(
            repo_id,
            local_files_only=True,
            **{k: v for k, v in hub_kwargs.items() if k in ("revision", "cache_dir")},
        )
        return True
    except Exception:
        return False
