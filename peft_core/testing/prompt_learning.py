"""The task-level checks every prompt-learning plugin runs, and the tiny models they use.

:class:`~peft_core.testing.MethodConformance` checks the adapter contract (save/load, disable,
trainable parameters, training); the input side of a prompt-learning method also has to work
per task: a causal LM's loss must skip the virtual positions, ``generate`` (greedy and beam,
padded batches) must agree with the forward pass, and encoder-decoder and encoder models must
run. A plugin subclasses :class:`PromptLearningTaskChecks` and writes :meth:`~PromptLearningTaskChecks.make_config`::

    class TestPromptTuningTasks(PromptLearningTaskChecks):
        def make_config(self, task_type, **options):
            return PromptTuningConfig(task_type=task_type, num_virtual_tokens=3, **options)

Models are built from configs (no downloads); every builder is seeded.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Callable
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from peft_core import PeftConfig, PeftModel, get_peft_model
from peft_core.testing.models import ModelCase

__all__ = [
    "PromptLearningTaskChecks",
    "greedy_by_forward",
    "padded_batch",
    "prompt_llama_case",
    "tiny_bert",
    "tiny_gpt2",
    "tiny_llama",
    "tiny_t5",
]

VOCAB = 48
PAD = 0


def _seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build().eval()


def tiny_llama(seed: int = 0, *, kv_heads: int = 2, layers: int = 2) -> nn.Module:
    """A ``LlamaForCausalLM`` with grouped-query attention (4 query heads, ``kv_heads`` key/value heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        intermediate_size=64,
        vocab_size=VOCAB,
        pad_token_id=PAD,
        max_position_embeddings=64,
    )
    return _seeded(lambda: LlamaForCausalLM(config), seed)


def tiny_gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, pad_token_id=PAD)
    return _seeded(lambda: GPT2LMHeadModel(config), seed)


def tiny_t5(seed: int = 0) -> nn.Module:
    """A ``T5ForConditionalGeneration`` (2 encoder and 2 decoder layers)."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        pad_token_id=PAD,
        decoder_start_token_id=PAD,
        eos_token_id=1,
    )
    return _seeded(lambda: T5ForConditionalGeneration(config), seed)


def tiny_bert(head: str = "seq_cls", seed: int = 0) -> nn.Module:
    """A tiny BERT: ``seq_cls``, ``token_cls``, ``qa`` or ``base`` (feature extraction)."""
    import transformers

    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        num_labels=2 if head == "qa" else 3,  # a QA head has two outputs (start, end)
        pad_token_id=PAD,
    )
    cls = {
        "seq_cls": transformers.BertForSequenceClassification,
        "token_cls": transformers.BertForTokenClassification,
        "qa": transformers.BertForQuestionAnswering,
        "base": transformers.BertModel,
    }[head]
    return _seeded(lambda: cls(config), seed)


def padded_batch(
    seed: int = 0, lengths: tuple[int, ...] = (5, 3), *, left: bool = True
) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of a batch padded (on the left by default) with token 0."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        tokens = torch.randint(2, VOCAB, (length,), generator=generator)
        span = slice(width - length, width) if left else slice(0, length)
        ids[row, span] = tokens
        mask[row, span] = 1
    return {"input_ids": ids, "attention_mask": mask}


def prompt_llama_case() -> ModelCase:
    """The kit's model for prompt-learning methods: a tiny GQA Llama fed a padded batch."""
    return ModelCase(
        name="prompt_llama",
        layer_kind="llama",
        builder=lambda: tiny_llama(seed=torch.initial_seed() % 2**16),
        input_maker=lambda g: padded_batch(int(torch.randint(0, 2**16, (1,), generator=g))),
        target_modules=(),
    )


@torch.no_grad()
def greedy_by_forward(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    steps: int,
    *,
    positions: bool = False,
    **extra_inputs: torch.Tensor,
) -> torch.Tensor:
    """Greedy decoding with full forward passes (no cache): the reference ``generate`` must agree with.

    ``positions``: pass the padding-aware ``position_ids`` that ``generate`` makes from the
    attention mask (methods that keep them, e.g. prefix tuning, which shifts them past the prefix).
    """
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    for _ in range(steps):
        extra = dict(extra_inputs)
        if positions:
            extra["position_ids"] = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        logits = model(input_ids=ids, attention_mask=mask, **extra).logits[:, -1]
        ids = torch.cat((ids, logits.argmax(-1, keepdim=True)), dim=1)
        mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
    return ids


def _trained_copy(model: PeftModel, seed: int = 0) -> PeftModel:
    """Perturb every trainable tensor, so saved prompts are not their init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.5 * torch.randn(param.shape, generator=generator).to(param))
    return model


class PromptLearningTaskChecks:
    """Subclass as ``Test<Method>Tasks`` and implement :meth:`make_config`.

    ``virtual_positions``: whether outputs gain ``num_virtual_tokens`` leading positions (methods
    that prepend embeddings) or keep the input length (prefix-cache methods).
    ``tasks``: the task types to check; drop those the method does not support, with a reason in
    ``unsupported``.
    """

    num_virtual_tokens: ClassVar[int] = 3
    virtual_positions: ClassVar[bool] = True
    unsupported: ClassVar[dict[str, str]] = {}
    """``{"<task type>": "why"}``: task checks skipped with that reason."""

    def make_config(self, task_type: str | None, **options: Any) -> PeftConfig:
        raise NotImplementedError(f"{type(self).__name__} must implement make_config(task_type, **options)")

    def method_inputs(self, batch_size: int) -> dict[str, torch.Tensor]:
        """Extra inputs the method's forward and generate need (e.g. ``task_ids``); none by default."""
        return {}

    def _with_method_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**inputs, **self.method_inputs(inputs["input_ids"].shape[0])}

    def _skip_unsupported(self, task: str) -> None:
        if task in self.unsupported:
            pytest.skip(f"{task}: {self.unsupported[task]}")

    def _adapt(self, base: nn.Module, task: str, seed: int = 0) -> PeftModel:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return get_peft_model(base, self.make_config(task))

    # ------------------------------------------------------------------ causal LM
    def test_causal_lm_loss_skips_virtual_positions(self) -> None:
        """The loss is the shifted cross-entropy of the real tokens: virtual positions carry label -100."""
        self._skip_unsupported("CAUSAL_LM")
        model = _trained_copy(self._adapt(tiny_llama(), "CAUSAL_LM")).eval()
        inputs = padded_batch(1)
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        with torch.no_grad():
            out = model(**self._with_method_inputs(inputs), labels=labels)
        length = inputs["input_ids"].shape[1]
        extra = self.num_virtual_tokens if self.virtual_positions else 0
        assert out.logits.shape[:2] == (2, length + extra)
        padded = torch.cat((torch.full((2, extra), -100), labels), dim=1)
        expected = nn.functional.cross_entropy(
            out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), padded[:, 1:].reshape(-1), ignore_index=-100
        )
        torch.testing.assert_close(out.loss, expected)
        with model.disable_adapter():
            base_logits = model(**inputs).logits
        assert not torch.allclose(out.logits[:, extra:], base_logits), "the prompt changed nothing"

    @pytest.mark.parametrize("num_beams", [1, 2])
    def test_causal_lm_generate_padded_batch(self, num_beams: int) -> None:
        """Greedy ``generate`` on a left-padded batch equals greedy decoding by full forward passes;
        beam search runs on the same batch and keeps the inputs as the start of each sequence."""
        self._skip_unsupported("CAUSAL_LM")
        model = _trained_copy(self._adapt(tiny_llama(), "CAUSAL_LM")).eval()
        inputs = padded_batch(2)
        extra = self.method_inputs(2)
        out = model.generate(
            **inputs, **extra, max_new_tokens=4, do_sample=False, num_beams=num_beams, pad_token_id=PAD
        )
        assert out.shape == (2, inputs["input_ids"].shape[1] + 4)
        assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
        if num_beams == 1:
            expected = greedy_by_forward(model, inputs, 4, positions=not self.virtual_positions, **extra)
            assert torch.equal(out, expected)
        with model.disable_adapter():
            plain = model.generate(
                **inputs, max_new_tokens=4, do_sample=False, num_beams=num_beams, pad_token_id=PAD
            )
        base = tiny_llama().generate(
            **inputs, max_new_tokens=4, do_sample=False, num_beams=num_beams, pad_token_id=PAD
        )
        assert torch.equal(plain, base)

    def test_causal_lm_training_lowers_the_loss(self) -> None:
        self._skip_unsupported("CAUSAL_LM")
        model = self._adapt(tiny_llama(), "CAUSAL_LM")
        inputs = padded_batch(3)
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        inputs = self._with_method_inputs(inputs)
        self._check_training(model, lambda: model(**inputs, labels=labels).loss)

    @staticmethod
    def _check_training(model: PeftModel, loss_fn: Callable[[], torch.Tensor], steps: int = 8) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        optimizer = torch.optim.Adam(params, lr=0.05)
        model.eval()  # no dropout noise: this checks the gradient reaches the prompt
        with torch.no_grad():
            initial = loss_fn().item()
        for _ in range(steps):
            optimizer.zero_grad()
            loss_fn().backward()
            optimizer.step()
        with torch.no_grad():
            final = loss_fn().item()
        assert final < initial, f"{steps} Adam steps did not lower the loss: {initial:.5g} -> {final:.5g}"
        changed = [n for n, v in frozen.items() if not torch.equal(model.get_parameter(n), v)]
        assert not changed, f"training changed frozen parameters: {changed[:3]}"

    def test_causal_lm_gpt2(self) -> None:
        """Another decoder family (learned absolute positions, Conv1D attention) runs and generates."""
        self._skip_unsupported("CAUSAL_LM")
        model = _trained_copy(self._adapt(tiny_gpt2(), "CAUSAL_LM")).eval()
        inputs = padded_batch(4, left=True)
        extra = self.method_inputs(2)
        out = model.generate(**inputs, **extra, max_new_tokens=3, do_sample=False, pad_token_id=PAD)
        assert torch.equal(
            out, greedy_by_forward(model, inputs, 3, positions=not self.virtual_positions, **extra)
        )

    # ------------------------------------------------------------------ encoder-decoder
    def test_seq2seq_forward_generate_and_training(self) -> None:
        """A tiny T5: forward with labels, greedy ``generate`` equal to forward decoding, training lowers the loss."""
        self._skip_unsupported("SEQ_2_SEQ_LM")
        model = _trained_copy(self._adapt(tiny_t5(), "SEQ_2_SEQ_LM")).eval()
        inputs = padded_batch(5, left=False)
        labels = torch.randint(2, VOCAB, (2, 4), generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            out = model(**inputs, labels=labels)
        assert out.logits.shape == (2, 4, VOCAB) and torch.isfinite(out.loss)
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        decoder = torch.full((2, 1), PAD)
        with torch.no_grad():
            for _ in range(generated.shape[1] - 1):
                logits = model(**inputs, decoder_input_ids=decoder).logits[:, -1]
                decoder = torch.cat((decoder, logits.argmax(-1, keepdim=True)), dim=1)
        assert torch.equal(generated, decoder)
        fresh = self._adapt(tiny_t5(), "SEQ_2_SEQ_LM")
        self._check_training(fresh, lambda: fresh(**inputs, labels=labels).loss)

    # ------------------------------------------------------------------ encoders
    def _encoder_round_trip(
        self, model: PeftModel, inputs: dict[str, torch.Tensor], head: str, task: str
    ) -> None:
        expected = model(**inputs)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            assert os.path.isfile(os.path.join(tmp, "adapter_model.safetensors"))
            loaded = PeftModel.from_pretrained(tiny_bert(head), tmp).eval()
        again = loaded(**inputs)
        for name in ("logits", "start_logits", "last_hidden_state"):
            if getattr(expected, name, None) is not None:
                torch.testing.assert_close(getattr(again, name), getattr(expected, name), rtol=0, atol=0)

    def test_sequence_classification_head_trains_and_round_trips(self) -> None:
        self._skip_unsupported("SEQ_CLS")
        model = self._adapt(tiny_bert("seq_cls"), "SEQ_CLS")
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert any("classifier.modules_to_save.default" in n for n in trainable), trainable
        inputs = self._with_method_inputs(padded_batch(6, left=False))
        inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
        labels = torch.tensor([0, 2])
        self._check_training(model, lambda: model(**inputs, labels=labels).loss)
        with torch.no_grad():
            assert model(**inputs).logits.shape == (2, 3)
            self._encoder_round_trip(_trained_copy(model).eval(), inputs, "seq_cls", "SEQ_CLS")

    @pytest.mark.parametrize(
        "task, head", [("TOKEN_CLS", "token_cls"), ("QUESTION_ANS", "qa"), ("FEATURE_EXTRACTION", "base")]
    )
    def test_encoder_tasks_run_and_round_trip(self, task: str, head: str) -> None:
        self._skip_unsupported(task)
        model = _trained_copy(self._adapt(tiny_bert(head), task)).eval()
        inputs = self._with_method_inputs(padded_batch(7, left=False))
        extra = self.num_virtual_tokens if self.virtual_positions else 0
        with torch.no_grad():
            out = model(**inputs)
            main = (
                out.logits
                if task == "TOKEN_CLS"
                else out.start_logits
                if task == "QUESTION_ANS"
                else out.last_hidden_state
            )
            assert main.shape[:2] == (2, inputs["input_ids"].shape[1] + extra)
            self._encoder_round_trip(model, inputs, head, task)

    # ------------------------------------------------------------------ adapters
    def test_adapters_switch_and_delete(self) -> None:
        self._skip_unsupported("CAUSAL_LM")
        model = _trained_copy(self._adapt(tiny_llama(), "CAUSAL_LM")).eval()
        inputs = self._with_method_inputs(padded_batch(8))
        with torch.no_grad():
            first = model(**inputs).logits
            with torch.random.fork_rng():
                torch.manual_seed(1)
                model.add_adapter("other", self.make_config("CAUSAL_LM"))
            model.set_adapter("other")
            second = model(**inputs).logits
            assert not torch.equal(first, second)
            with pytest.raises(ValueError, match="one adapter at a time"):
                model.set_adapter(["default", "other"])
            model.delete_adapter("other")
            assert model.active_adapters == ["default"]
            torch.testing.assert_close(model(**inputs).logits, first, rtol=0, atol=0)
        model2 = copy.deepcopy(model)
        with pytest.raises(TypeError, match="mixed-adapter"):
            model2(**inputs, adapter_names=["default", "default"])
