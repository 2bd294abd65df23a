"""The CPT prompt (frozen example embeddings + projected deltas), its loss, and the adapter model."""

from __future__ import annotations

import math
from typing import Any

import torch
from peft_core.prompt_learning import VirtualTokenModel
from torch import nn

from peft_cpt.config import CPTConfig

__all__ = ["CPTEmbedding", "CPTModel", "cpt_loss"]

_TINY = 1e-10  # the radius of tokens whose deltas do not train (types 0 and outputs)


class CPTEmbedding(nn.Module):
    """``embedding`` (the example's token embeddings, frozen) + ``delta_embedding`` (trained, projected).

    Each forward first projects every delta row into its token type's epsilon ball, as the
    reference does, so the deltas never leave it whatever the optimizer does.
    """

    def __init__(self, config: CPTConfig, word_embeddings: nn.Module) -> None:
        super().__init__()
        rows, dim = config.num_virtual_tokens, config.token_dim
        self.types = torch.tensor(config.cpt_tokens_type_mask, dtype=torch.long)
        self.embedding = nn.Embedding(rows, dim)
        if not config.inference_mode:
            ids = torch.tensor(config.cpt_token_ids, dtype=torch.long, device=word_embeddings.weight.device)
            with torch.no_grad():
                table = word_embeddings(ids).detach().clone()
            self.embedding.weight = nn.Parameter(table.to(torch.float32))
        self.embedding.requires_grad_(False)
        self.delta_embedding = nn.Embedding(rows, dim)
        self.delta_embedding.weight.data = torch.zeros_like(self.delta_embedding.weight, dtype=torch.float32)
        scale = math.sqrt(dim / 2048)
        kind = self.types.remainder(4)
        self.epsilon = torch.full((rows,), _TINY)
        templates = (self.types > 0) & ((kind == 1) | (kind == 3))
        self.epsilon[templates] = config.opt_projection_format_epsilon * scale
        self.epsilon[(self.types > 0) & (kind == 2)] = config.opt_projection_epsilon * scale
        trained = ((kind == 1) | (kind == 2) | (kind == 3)).view(-1, 1).float()
        # Only template and input tokens learn; outputs (type 4k) keep their embeddings.
        self.delta_embedding.weight.register_hook(lambda grad: grad * trained.to(grad.device))

    def projected_deltas(self) -> torch.Tensor:
        with torch.no_grad():
            deltas = self.delta_embedding.weight.clone()
            norms = deltas.norm(p=2, dim=1)
            moved = norms > 0
            if moved.any():
                epsilon = self.epsilon.to(deltas.device)
                deltas[moved] *= (epsilon[moved] / norms[moved].clamp(min=epsilon[moved])).view(-1, 1)
            return deltas

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            base = self.embedding(indices)
        self.delta_embedding.weight.data = self.projected_deltas()
        return base + self.delta_embedding(indices)


def cpt_loss(
    logits: torch.Tensor, labels: torch.Tensor, type_mask: torch.Tensor, config: CPTConfig
) -> torch.Tensor:
    """Mean cross-entropy over the output tokens, optionally decayed for earlier examples (the reference's)."""
    shift_logits, shift_labels = logits[..., :-1, :], labels[..., 1:].to(logits.device)
    shift_types = type_mask[..., 1:].to(logits.device)
    counted = shift_labels != -100
    batch, length, vocab = shift_logits.shape
    loss = nn.functional.cross_entropy(
        shift_logits.reshape(batch * length, vocab),
        shift_labels.reshape(-1),
        reduction="none",
        ignore_index=-100,
    ).view(batch, length)
    weights = counted.float()
    if config.opt_weighted_loss_type == "decay":
        for row in range(batch):
            types = shift_types[row]
            outputs = types[(types > 0) & (types % 4 == 0)].unique()
            decay = torch.ones_like(types, dtype=torch.float32)
            value = 1.0
            for example in torch.flip(outputs, [0]):  # the last example weighs 1, earlier ones less
                decay[types == example] = value
                value *= config.opt_loss_decay_factor
            weights[row] *= decay
    return (loss[counted] * weights[counted]).mean()


class CPTModel(VirtualTokenModel):
    """CPT: the causal-LM loss counts only output tokens (type ``4k``), of the prompt example and the input.

    ``forward`` takes an optional ``input_type_mask`` (types of the input tokens; default 4, outputs).
    """

    def create_prompt_encoder(self, config: CPTConfig, word_embeddings: nn.Module) -> nn.Module:
        return CPTEmbedding(config, word_embeddings)

    def task_forward(self, task: str | None, kwargs: dict[str, Any]) -> Any:
        input_types = kwargs.pop("input_type_mask", None)
        labels = kwargs.pop("labels", None)
        if labels is None:
            return super().task_forward(task, kwargs)
        config = self.active_config
        ids = kwargs.get("input_ids")
        inputs = ids if ids is not None else kwargs["inputs_embeds"]
        batch, length = inputs.shape[0], inputs.shape[1]
        if input_types is None:
            input_types = torch.full((batch, length), 4, dtype=torch.long, device=labels.device)
        prompt_labels = torch.tensor(config.cpt_token_ids, device=labels.device).expand(batch, -1)
        prompt_types = torch.tensor(config.cpt_tokens_type_mask, device=labels.device).expand(batch, -1)
        shifted = input_types.to(labels.device).long().clone()  # the caller's mask stays as it was
        shifted[shifted > 0] += prompt_types.max()
        types = torch.cat((prompt_types, shifted), dim=1)
        all_labels = torch.cat((prompt_labels, labels), dim=1)
        all_labels[~((types > 0) & (types % 4 == 0))] = -100
        # The strategy prepends -100 for the virtual positions; CPT's labels there come from the example.
        output = super().task_forward(task, kwargs)
        output.loss = cpt_loss(output.logits, all_labels, types, config)
        return output

    def prompt_table(self, adapter_name: str) -> torch.Tensor:
        encoder = self.prompt_encoder[adapter_name]
        if self.peft_config[adapter_name].inference_mode:
            return encoder.embedding.weight
        indices = torch.arange(encoder.embedding.num_embeddings, device=encoder.embedding.weight.device)
        return encoder(indices.unsqueeze(0))[0]
