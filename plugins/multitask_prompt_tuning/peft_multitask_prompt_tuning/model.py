"""The multitask prompt module, and the adapter model that prepends each sample's task prompt."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from peft_core.errors import ConfigError
from peft_core.prompt_learning import VirtualTokenModel, repeat_to, total_virtual_tokens
from torch import nn

from peft_multitask_prompt_tuning.config import (
    SOURCE_INITS,
    MultitaskPromptTuningConfig,
    MultitaskPromptTuningInit,
)

__all__ = ["MultitaskPromptEmbedding", "MultitaskPromptTuningModel"]

_TASK_KEYS = ("prefix_task_cols", "prefix_task_rows")


def _source_state(config: MultitaskPromptTuningConfig) -> dict[str, torch.Tensor]:
    path = config.prompt_tuning_init_state_dict_path
    if path is None:
        raise ConfigError(
            f"prompt_tuning_init={config.prompt_tuning_init.value} needs prompt_tuning_init_state_dict_path."
        )
    if not str(path).endswith(".safetensors"):
        raise ConfigError(
            f"prompt_tuning_init_state_dict_path={path!r} is not a .safetensors file; peft-core does not unpickle "
            "checkpoints (that can run arbitrary code). Convert it to safetensors."
        )
    from safetensors.torch import load_file

    return load_file(path)


class MultitaskPromptEmbedding(nn.Module):
    """``embedding`` (the shared table) and the per-task factors ``prefix_task_cols``/``prefix_task_rows``."""

    def __init__(self, config: MultitaskPromptTuningConfig, word_embeddings: nn.Module) -> None:
        super().__init__()
        rows = total_virtual_tokens(config)
        self.embedding = nn.Embedding(rows, config.token_dim)
        if config.prompt_tuning_init == MultitaskPromptTuningInit.TEXT and not config.inference_mode:
            self._init_from_text(config, word_embeddings, rows)
        self.prefix_task_cols = nn.Parameter(
            torch.normal(0, 0.02, size=(config.num_tasks, rows, config.num_ranks))
        )
        self.prefix_task_rows = nn.Parameter(
            torch.normal(0, 0.02, size=(config.num_tasks, config.num_ranks, config.token_dim))
        )
        if config.prompt_tuning_init in SOURCE_INITS:
            self._init_from_source(config)

    def _init_from_text(
        self, config: MultitaskPromptTuningConfig, word_embeddings: nn.Module, rows: int
    ) -> None:
        from transformers import AutoTokenizer

        options = dict(config.tokenizer_kwargs or {})
        options.pop("trust_remote_code", None)
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **options)
        ids = torch.tensor(repeat_to(list(tokenizer(config.prompt_tuning_init_text)["input_ids"]), rows))
        with torch.no_grad():
            table = word_embeddings(ids.to(word_embeddings.weight.device)).detach().clone()
        self.embedding.weight = nn.Parameter(table.to(torch.float32))

    def _init_from_source(self, config: MultitaskPromptTuningConfig) -> None:
        source = _source_state(config)
        with torch.no_grad():
            self.embedding.weight.copy_(source["prompt_embeddings"])
            if config.prompt_tuning_init == MultitaskPromptTuningInit.ONLY_SOURCE_SHARED:
                return
            cols, rows = source["prefix_task_cols"], source["prefix_task_rows"]
            if config.prompt_tuning_init == MultitaskPromptTuningInit.AVERAGE_SOURCE_TASKS:
                cols, rows = cols.mean(0, keepdim=True), rows.mean(0, keepdim=True)
            else:
                task = config.prompt_tuning_init_task
                cols, rows = cols[task].unsqueeze(0), rows[task].unsqueeze(0)
            if cols.shape != self.prefix_task_cols.shape or rows.shape != self.prefix_task_rows.shape:
                raise ConfigError(
                    f"The source task factors have shapes {tuple(cols.shape)} and {tuple(rows.shape)}, but this "
                    f"adapter's are {tuple(self.prefix_task_cols.shape)} and {tuple(self.prefix_task_rows.shape)}: "
                    "a source-task init makes one task (num_tasks=1) of the same num_ranks and sizes."
                )
            self.prefix_task_cols.copy_(cols)
            self.prefix_task_rows.copy_(rows)

    def forward(self, indices: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        if task_ids is None:
            raise ValueError(
                "Multitask prompt tuning needs task_ids (one task id per sample) in forward and generate."
            )
        shared = self.embedding(indices)
        task_prompts = torch.matmul(
            self.prefix_task_cols.index_select(0, task_ids), self.prefix_task_rows.index_select(0, task_ids)
        )
        return shared * task_prompts


class MultitaskPromptTuningModel(VirtualTokenModel):
    """Saves the shared table (``prompt_embeddings``) and the task factors, all trainable after loading."""

    loads_trainable = True

    def create_prompt_encoder(
        self, config: MultitaskPromptTuningConfig, word_embeddings: nn.Module
    ) -> nn.Module:
        if config.task_type == "SEQ_2_SEQ_LM":
            raise ConfigError(
                "Multitask prompt tuning is not supported for SEQ_2_SEQ_LM here: the reference feeds the decoder a "
                "prompt in forward but not in generate, so no behaviour could match both."
            )
        return MultitaskPromptEmbedding(config, word_embeddings)

    def prompt_table(self, adapter_name: str) -> torch.Tensor:
        return self.prompt_encoder[
            adapter_name
        ].embedding.weight  # the shared table, as the reference saves it

    def virtual_tokens(self, batch_size: int, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        encoder = self.prompt_encoder[self.active_adapters[0]]
        if task_ids is not None and task_ids.shape[0] != batch_size:  # generate expanded the batch (beams)
            task_ids = task_ids.repeat_interleave(batch_size // task_ids.shape[0])
        if task_ids is not None:
            task_ids = task_ids.to(encoder.prefix_task_cols.device)
        rows = encoder.embedding.num_embeddings
        indices = (
            torch.arange(rows, device=encoder.embedding.weight.device).unsqueeze(0).expand(batch_size, -1)
        )
        return encoder(indices, task_ids)

    def adapter_state_entries(self, adapter_name: str) -> Iterator[Any]:
        yield from super().adapter_state_entries(adapter_name)
        encoder = self.prompt_encoder[adapter_name]
        for key in _TASK_KEYS:
            tensor = getattr(encoder, key)
            yield (
                f"prompt_encoder.{adapter_name}.{key}",
                key,
                tensor,
                lambda value, tensor=tensor: tensor.copy_(value.to(device=tensor.device, dtype=tensor.dtype)),
            )
