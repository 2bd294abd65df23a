"""The conformance kit's prompt-learning checks, and the causal-LM task checks, for CPT."""

from __future__ import annotations

import pytest
import torch
from hypothesis import strategies as st
from peft_core import get_peft_model
from peft_core.testing import MethodConformance, ModelCase
from peft_core.testing.prompt_learning import (
    PromptLearningTaskChecks,
    padded_batch,
    prompt_llama_case,
    tiny_llama,
)

from peft_cpt import CPTConfig
from peft_cpt.model import cpt_loss

NOT_CAUSAL = "CPT is defined for causal LMs only (CPTConfig refuses other task types, as in the reference)"


class TestCPTConformance(MethodConformance):
    peft_type = "CPT"
    layer_kinds = ("llama",)

    def case_strategy(self) -> st.SearchStrategy[ModelCase]:
        return st.just(prompt_llama_case())

    def config_strategy(self, case: ModelCase, *, identity: bool) -> st.SearchStrategy[CPTConfig]:
        # Wide projection radii: the default ones (0.1 * sqrt(token_dim / 2048), ~0.01 here) keep the
        # deltas so small that the kit's teacher cannot differ measurably from the student.
        return st.builds(
            CPTConfig,
            task_type=st.just("CAUSAL_LM"),
            cpt_token_ids=st.lists(st.integers(2, 40), min_size=1, max_size=4),
            opt_projection_epsilon=st.just(50.0),
            opt_projection_format_epsilon=st.just(50.0),
        )


class TestCPTTasks(PromptLearningTaskChecks):
    unsupported = {
        task: NOT_CAUSAL
        for task in ("SEQ_2_SEQ_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
    }

    def make_config(self, task_type, **options):
        return CPTConfig(
            task_type=task_type,
            cpt_token_ids=[5, 6, 7],
            cpt_tokens_type_mask=[1, 2, 4],  # one in-context example: template, input, output
            opt_projection_epsilon=50.0,
            opt_projection_format_epsilon=50.0,
            **options,
        )

    def test_causal_lm_loss_skips_virtual_positions(self) -> None:
        """CPT's loss: the mean cross-entropy of the tokens typed as outputs (4k), prompt and input alike."""
        model = self._adapt(tiny_llama(), "CAUSAL_LM").eval()
        config = model.peft_config["default"]
        inputs = padded_batch(1)
        labels = inputs["input_ids"]
        types = torch.tensor([[0, 0, 1, 2, 4], [1, 2, 3, 4, 4]])
        out = model(**inputs, labels=labels, input_type_mask=types)
        assert out.logits.shape[:2] == (2, 3 + 5)
        assert torch.equal(types, torch.tensor([[0, 0, 1, 2, 4], [1, 2, 3, 4, 4]])), (
            "input_type_mask was changed"
        )
        all_types = torch.cat((torch.tensor([[1, 2, 4]] * 2), types + 4 * (types > 0)), dim=1)
        all_labels = torch.cat((torch.tensor([[5, 6, 7]] * 2), labels), dim=1)
        all_labels[~((all_types > 0) & (all_types % 4 == 0))] = -100
        assert (all_labels != -100).sum() == 2 + 3  # the prompt's output token, and the inputs typed 4
        torch.testing.assert_close(out.loss, cpt_loss(out.logits, all_labels, all_types, config))

    def test_causal_lm_training_lowers_the_loss(self) -> None:
        model = self._adapt(tiny_llama(), "CAUSAL_LM")
        inputs = padded_batch(3)
        types = inputs["attention_mask"] * 4  # every real token is an output
        self._check_training(
            model, lambda: model(**inputs, labels=inputs["input_ids"], input_type_mask=types).loss
        )

    def test_deltas_stay_in_their_epsilon_ball_and_outputs_do_not_train(self) -> None:
        config = CPTConfig(
            task_type="CAUSAL_LM", cpt_token_ids=[5, 6, 7, 8], cpt_tokens_type_mask=[1, 2, 3, 4]
        )
        model = get_peft_model(tiny_llama(), config)
        encoder = model.base_model.prompt_encoder["default"]
        inputs = padded_batch(4)
        types = inputs["attention_mask"] * 4
        loss = model(**inputs, labels=inputs["input_ids"], input_type_mask=types).loss
        loss.backward()
        assert encoder.delta_embedding.weight.grad[3].abs().sum() == 0  # the prompt's output token
        with torch.no_grad():
            encoder.delta_embedding.weight.add_(10.0)
        model(**inputs)
        norms = encoder.delta_embedding.weight.norm(dim=1)
        limit = 0.1 * (32 / 2048) ** 0.5
        assert torch.all(norms[:3] <= limit + 1e-6) and norms[3] <= 1e-9
        with pytest.raises(Exception, match="CAUSAL_LM"):
            CPTConfig(task_type="SEQ_CLS")
