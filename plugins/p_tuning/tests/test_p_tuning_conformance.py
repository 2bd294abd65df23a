"""The conformance kit's prompt-learning checks, and the per-task checks, for P-tuning (MLP and LSTM)."""

from __future__ import annotations

from hypothesis import strategies as st
from peft_core.testing import MethodConformance, ModelCase
from peft_core.testing.prompt_learning import PromptLearningTaskChecks, prompt_llama_case

from peft_p_tuning import PromptEncoderConfig


class TestPTuningConformance(MethodConformance):
    peft_type = "P_TUNING"
    layer_kinds = ("llama",)

    def case_strategy(self) -> st.SearchStrategy[ModelCase]:
        return st.just(prompt_llama_case())

    def config_strategy(self, case: ModelCase, *, identity: bool) -> st.SearchStrategy[PromptEncoderConfig]:
        return st.builds(
            PromptEncoderConfig,
            task_type=st.sampled_from(["CAUSAL_LM", None]),
            num_virtual_tokens=st.integers(1, 4),
            encoder_reparameterization_type=st.sampled_from(["MLP", "LSTM"]),
            encoder_hidden_size=st.sampled_from([None, 8, 16]),
            encoder_num_layers=st.just(2),
        )


class TestPTuningMLPTasks(PromptLearningTaskChecks):
    def make_config(self, task_type, **options):
        return PromptEncoderConfig(task_type=task_type, num_virtual_tokens=self.num_virtual_tokens, **options)


class TestPTuningLSTMTasks(PromptLearningTaskChecks):
    def make_config(self, task_type, **options):
        return PromptEncoderConfig(
            task_type=task_type,
            num_virtual_tokens=self.num_virtual_tokens,
            encoder_reparameterization_type="LSTM",
            encoder_hidden_size=16,
            **options,
        )
