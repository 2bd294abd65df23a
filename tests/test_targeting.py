"""Target matching follows the reference library's semantics (checked against it as an oracle)."""

from __future__ import annotations

import types

import pytest
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from peft_core.targeting import expand_all_linear, is_excluded, match_target, pattern_value, unmatched_entries


def cfg(**kw):
    base = dict(
        target_modules=None,
        exclude_modules=None,
        layers_to_transform=None,
        layers_pattern=None,
        modules_to_save=None,
    )
    base.update(kw)
    return types.SimpleNamespace(**base)


def test_list_entries_match_exact_name_or_dotted_suffix():
    c = cfg(target_modules=["q_proj", "mlp.up"])
    assert match_target(c, "q_proj")
    assert match_target(c, "model.layers.0.self_attn.q_proj")
    assert match_target(c, "layers.3.mlp.up")
    assert not match_target(c, "model.layers.0.self_attn.xq_proj")  # suffix must start at a dot
    assert not match_target(c, "model.q_proj.inner")


def test_string_is_a_full_regex():
    c = cfg(target_modules=r".*\.(q|v)_proj")
    assert match_target(c, "model.layers.0.q_proj")
    assert not match_target(c, "model.layers.0.q_proj.lora")
    assert not match_target(c, "q_proj")  # the regex needs a dot before


def test_exclude_modules_wins_in_both_forms():
    assert not match_target(cfg(target_modules=["q"], exclude_modules=["layers.1.q"]), "m.layers.1.q")
    assert match_target(cfg(target_modules=["q"], exclude_modules=["layers.1.q"]), "m.layers.0.q")
    assert not match_target(cfg(target_modules=["q"], exclude_modules=r".*1\.q"), "m.layers.1.q")


def test_layers_to_transform_with_and_without_pattern():
    c = cfg(target_modules=["q"], layers_to_transform=[1])
    assert match_target(c, "model.layers.1.attn.q")
    assert not match_target(c, "model.layers.0.attn.q")
    c = cfg(target_modules=["q"], layers_to_transform=0, layers_pattern="h")
    assert match_target(c, "transformer.h.0.attn.q")
    assert not match_target(c, "transformer.h.2.attn.q")
    # a regex target ignores layers_to_transform, as in the reference
    assert match_target(cfg(target_modules=r".*q", layers_to_transform=[5]), "model.layers.0.q")


def test_modules_to_save_are_never_targets():
    c = cfg(target_modules=["classifier", "q"], modules_to_save=["classifier"])
    assert not match_target(c, "classifier")
    assert is_excluded(c, "model.classifier.dense")
    assert match_target(c, "model.q")


def test_pattern_value_matches_name_suffix_regex():
    patterns = {"layers.0.q": 4, r"v\w*": 8}
    assert pattern_value(patterns, "model.layers.0.q", 2) == 4
    assert pattern_value(patterns, "model.layers.10.q", 2) == 2
    assert pattern_value(patterns, "model.layers.1.value", 2) == 8
    assert pattern_value(None, "x", 3) == 3


def test_unmatched_entries():
    assert unmatched_entries(["q", "nope", "attn.k"], ["m.attn.q", "m.attn.k"]) == ["nope"]


def test_all_linear_skips_the_output_layer():
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.ModuleDict(
                {"q": nn.Linear(2, 2), "up": nn.Linear(2, 2), "emb": nn.Embedding(3, 2)}
            )
            self.lm_head = nn.Linear(2, 3)

        def get_output_embeddings(self):
            return self.lm_head

    assert expand_all_linear(LM()) == ["q", "up"]


# ----------------------------------------------------------------------------- oracle
peft_utils = pytest.importorskip(
    "peft.tuners.tuners_utils", reason="the reference library is the oracle here"
)

segment = st.sampled_from(
    ["model", "layers", "h", "0", "1", "2", "attn", "q", "k", "q_proj", "mlp", "up", "v"]
)
names = st.lists(segment, min_size=1, max_size=5).map(".".join)


@given(
    key=names,
    targets=st.one_of(
        st.lists(st.lists(segment, min_size=1, max_size=2).map(".".join), min_size=1, max_size=3),
        st.sampled_from([r".*q", r"model\..*", r".*\.(q|k)", r"layers\.\d\..*"]),
    ),
    exclude=st.one_of(st.none(), st.lists(segment, min_size=1, max_size=2)),
    layers=st.one_of(st.none(), st.lists(st.integers(0, 2), min_size=1, max_size=2), st.integers(0, 2)),
    pattern=st.one_of(st.none(), st.sampled_from(["layers", "h", ["layers", "h"]])),
)
def test_same_decision_as_reference(key, targets, exclude, layers, pattern):
    if pattern is not None and layers is None:
        layers = [0]
    c = cfg(
        target_modules=targets,
        exclude_modules=exclude,
        layers_to_transform=layers,
        layers_pattern=pattern,
        target_parameters=None,
    )
    ours = match_target(c, key)
    theirs = peft_utils.check_target_module_exists(c, key)
    if isinstance(theirs, peft_utils._ExcludedModule):
        theirs = False
    assert ours == bool(theirs)
