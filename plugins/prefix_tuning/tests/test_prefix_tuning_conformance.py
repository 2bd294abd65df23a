"""The conformance kit's prompt-learning checks, and the per-task checks, for prefix tuning."""

from __future__ import annotations

from hypothesis import strategies as st
from peft_core.testing import MethodConformance, ModelCase
from peft_core.testing.prompt_learning import PromptLearningTaskChecks, prompt_llama_case

from peft_prefix_tuning import PrefixTuningConfig


class TestPrefixTuningConformance(MethodConformance):
    peft_type = "PREFIX_TUNING"
    layer_kinds = ("llama",)

    def case_strategy(self) -> st.SearchStrategy[ModelCase]:
        return st.just(prompt_llama_case())  # grouped-query attention: 4 query heads, 2 key/value heads

    def config_strategy(self, case: ModelCase, *, identity: bool) -> st.SearchStrategy[PrefixTuningConfig]:
        return st.builds(
            PrefixTuningConfig,
            task_type=st.sampled_from(["CAUSAL_LM", None]),
            num_virtual_tokens=st.integers(1, 4),
            prefix_projection=st.booleans(),
            encoder_hidden_size=st.sampled_from([None, 8]),
        )


class TestPrefixTuningTasks(PromptLearningTaskChecks):
    virtual_positions = False  # the prefix is attention cache: outputs keep the input length

    def make_config(self, task_type, **options):
        return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=self.num_virtual_tokens, **options)


class TestPrefixTuningProjectionTasks(TestPrefixTuningTasks):
    def make_config(self, task_type, **options):
        return PrefixTuningConfig(
            task_type=task_type, num_virtual_tokens=self.num_virtual_tokens, prefix_projection=True, **options
        )
