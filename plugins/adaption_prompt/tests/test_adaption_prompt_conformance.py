"""The peft-core conformance kit on tiny Llama, Mistral and Qwen2 causal LMs (left-padded batches)."""

from __future__ import annotations

import weakref
from typing import ClassVar

from adaption_prompt_models import FAMILIES, layers_of, lm_case, open_gates
from hypothesis import strategies as st
from peft_core import PeftConfig, PeftModel
from peft_core.testing import MethodConformance, ModelCase

from peft_adaption_prompt import AdaptionPromptConfig

# Configs drawn with identity=False, by id (configs are unhashable attrs classes): their adapters get
# open gates. The reference config has no init option (a fresh gate is always 0, the identity), so the
# kit's "an init that changes the output" is made here, after the adapter is created, as training would.
_NON_IDENTITY: dict[int, weakref.ref] = {}


def _mark_non_identity(config: AdaptionPromptConfig) -> AdaptionPromptConfig:
    _NON_IDENTITY[id(config)] = weakref.ref(config)
    return config


def _is_non_identity(config: PeftConfig) -> bool:
    ref = _NON_IDENTITY.get(id(config))
    return ref is not None and ref() is config


@st.composite
def _cases(draw: st.DrawFn) -> ModelCase:
    heads = draw(st.sampled_from([2, 4]))
    return lm_case(
        family=draw(st.sampled_from(FAMILIES)),
        hidden=draw(st.sampled_from([8, 16])),
        heads=heads,
        kv_heads=draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0])),
        layers=draw(st.integers(1, 3)),
        lengths=tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=2))),
    )


class TestAdaptionPromptConformance(MethodConformance):
    peft_type = "ADAPTION_PROMPT"
    layer_kinds = ("llama",)
    deviations: ClassVar[dict[str, str]] = {}

    def case_strategy(self) -> st.SearchStrategy[ModelCase]:
        return _cases()

    def config_strategy(self, case: ModelCase, *, identity: bool) -> st.SearchStrategy[AdaptionPromptConfig]:
        configs = st.builds(
            AdaptionPromptConfig,
            task_type=st.sampled_from(["CAUSAL_LM", None]),
            target_modules=st.sampled_from([None, "self_attn"]),
            adapter_len=st.integers(1, 4),
            adapter_layers=st.integers(1, layers_of(case)),
        )
        return configs if identity else configs.map(_mark_non_identity)

    @staticmethod
    def _adapt(model, config: PeftConfig, seed: int) -> PeftModel:
        peft_model = MethodConformance._adapt(model, config, seed)
        if _is_non_identity(config):
            open_gates(peft_model, "default", seed)
        return peft_model

    @staticmethod
    def _add_adapter(model: PeftModel, name: str, config: PeftConfig, seed: int) -> None:
        MethodConformance._add_adapter(model, name, config, seed)
        if _is_non_identity(config):
            open_gates(model, name, seed)
