"""Reading and writing adapter files safely: atomic writes, no unpickling unless asked."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

import torch

from peft_core.errors import AdapterLoadError, CorruptCheckpointError

__all__ = ["atomic_directory", "atomic_write_text", "load_weights", "save_weights"]


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory, then rename."""
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike[str]) -> Iterator[str]:
    """Yield a staging directory whose files land in ``target`` only if the block succeeds.

    A new ``target`` appears by one rename. An existing ``target`` (e.g. a training checkpoint
    that holds other files) keeps its other files; each staged file replaces its counterpart by
    rename, so no reader ever sees a half-written file.
    """
    target = os.path.abspath(os.fspath(target))
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(target)}.tmp-")
    try:
        yield staging
        if not os.path.exists(target):
            try:
                os.rename(staging, target)
                return
            except OSError:  # lost a race with a concurrent creator; fall back to merging
                pass
        for root, _dirs, files in os.walk(staging):
            rel = os.path.relpath(root, staging)
            dest_dir = target if rel == "." else os.path.join(target, rel)
            os.makedirs(dest_dir, exist_ok=True)
            for name in files:
                os.replace(os.path.join(root, name), os.path.join(dest_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _dedupe_storage(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Clone tensors that share storage (safetensors refuses aliasing) and make all contiguous."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for key, tensor in state_dict.items():
        tensor = tensor.detach()
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if ident in seen or not tensor.is_contiguous():
            tensor = tensor.contiguous().clone()
        seen.add(ident)
        out[key] = tensor
    return out


def save_weights(state_dict: dict[str, torch.Tensor], path: str, *, safe_serialization: bool = True) -> None:
    tensors = _dedupe_storage(state_dict)
    if safe_serialization:
        from safetensors.torch import save_file

        save_file({k: v.cpu() for k, v in tensors.items()}, path, metadata={"format": "pt"})
    else:
        torch.save(tensors, path)


def load_weights(
    path: str, *, device: str | torch.device = "cpu", allow_pickle: bool = False
) -> dict[str, torch.Tensor]:
    """Load a weights file fully into memory, or raise an error that names the file and the problem."""
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device=str(device))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            size = os.path.getsize(path) if os.path.exists(path) else 0
            raise CorruptCheckpointError(
                f"{path!r} ({size} bytes) is not a readable safetensors file ({exc}). It is probably truncated or "
                "corrupt (an interrupted download or copy); fetch or save it again."
            ) from exc
    if not allow_pickle:
        raise AdapterLoadError(
            f"{path!r} is a pickle file; loading it can run arbitrary code, so peft-core does not unpickle by "
            "default. Pass allow_pickle=True if you trust its source, or convert it to safetensors."
        )
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise CorruptCheckpointError(f"{path!r} could not be read as a torch checkpoint: {exc}") from exc
