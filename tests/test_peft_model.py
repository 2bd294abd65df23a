"""PeftModel behaviour on the toy method: files, adapters, merging, and loads that fail safely."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors import safe_open
from torch import nn

from peft_core import (
    AdapterLoadError,
    CheckpointShapeError,
    CorruptCheckpointError,
    PeftModel,
    TargetModulesError,
    UnknownMethodError,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from peft_core.layer import AdapterLayer

peft_toy = pytest.importorskip("peft_toy", reason="the toy plugin (tests/toy_plugin) must be installed")
ToyConfig = peft_toy.ToyConfig


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


X = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))


def toy(**kw) -> ToyConfig:
    kw.setdefault("target_modules", ["0", "2"])
    kw.setdefault("init_weights", False)
    return ToyConfig(**kw)


def snapshot(model: nn.Module) -> tuple[list[str], dict[str, torch.Tensor]]:
    return [type(m).__name__ for m in model.modules()], {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before) -> None:
    types, state = before
    assert [type(m).__name__ for m in model.modules()] == types
    after = model.state_dict()
    assert after.keys() == state.keys()
    for key, value in state.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, equal_nan=True, msg=key)


# ----------------------------------------------------------------------------- files
def test_save_layout_matches_the_reference_format(tmp_path):
    model = get_peft_model(mlp(), toy(modules_to_save=["1"]))
    model.add_adapter("second", toy(target_modules=["4"]))
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "second",
    ]
    assert sorted(os.listdir(tmp_path / "second")) == ["adapter_config.json", "adapter_model.safetensors"]
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as fh:
        assert fh.metadata() == {"format": "pt"}
        keys = set(fh.keys())
    assert keys == {"base_model.model.0.toy_scale", "base_model.model.2.toy_scale"}
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "TOY" and config["inference_mode"] is True
    assert config["auto_mapping"] == {
        "base_model_class": "Sequential",
        "parent_library": "torch.nn.modules.container",
    }
    assert model.peft_config["default"].inference_mode is False  # saving does not change the live config


def test_modules_to_save_keys_drop_wrapper_and_adapter_name(tmp_path):
    model = get_peft_model(mlp(), toy(modules_to_save=["4"], target_modules=["0"]))
    keys = set(get_peft_model_state_dict(model))
    assert keys == {"base_model.model.0.toy_scale", "base_model.model.4.weight", "base_model.model.4.bias"}


def test_round_trip_gives_identical_outputs_and_selected_adapters(tmp_path):
    model = get_peft_model(mlp(), toy(modules_to_save=["4"]))
    with torch.no_grad():
        model.base_model.model[4].modules_to_save["default"].weight.add_(1.0)
    model.add_adapter("other", toy(target_modules=["2", "4"]))
    expected = model(X)
    model.set_adapter("other")
    expected_other = model(X)
    model.save_pretrained(tmp_path, selected_adapters=["default", "other"])

    loaded = PeftModel.from_pretrained(mlp(), tmp_path)
    torch.testing.assert_close(loaded(X), expected, rtol=0, atol=0)
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    loaded.set_adapter("other")
    torch.testing.assert_close(loaded(X), expected_other, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference by default

    trainable = PeftModel.from_pretrained(mlp(), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] > 0

    with pytest.raises(ValueError, match="unknown adapter"):
        model.save_pretrained(tmp_path / "x", selected_adapters=["nope"])


def test_set_adapter_accepts_several_names_and_their_effects_add_up():
    base = mlp()
    model = get_peft_model(copy.deepcopy(base), toy(target_modules=["2"]))
    model.add_adapter("b", toy(target_modules=["2"]))
    model.set_adapter(["default", "b"])
    assert model.active_adapters == ["default", "b"]
    both = model(X)
    model.set_adapter("default")
    one = model(X)
    assert not torch.allclose(both, one)
    model.merge_adapter(adapter_names=["default", "b"])
    model.set_adapter(["default", "b"])  # switching unmerges first, with a warning
    torch.testing.assert_close(model(X), both)


def test_delete_adapter_keeps_the_others():
    model = get_peft_model(mlp(), toy())
    model.add_adapter("b", toy())
    expected = model(X)
    model.delete_adapter("b")
    torch.testing.assert_close(model(X), expected, rtol=0, atol=0)
    assert list(model.peft_config) == ["default"]
    with pytest.raises(ValueError, match="does not exist"):
        model.delete_adapter("b")


def test_disable_adapter_context_restores_state():
    base = mlp()
    reference = copy.deepcopy(base)(X)
    model = get_peft_model(base, toy())
    adapted = model(X)
    with model.disable_adapter():
        torch.testing.assert_close(model(X), reference, rtol=0, atol=0)
    torch.testing.assert_close(model(X), adapted, rtol=0, atol=0)


def test_merge_and_unload_and_unload():
    base = mlp()
    reference = copy.deepcopy(base)(X)
    model = get_peft_model(copy.deepcopy(base), toy(modules_to_save=["4"]))
    with torch.no_grad():
        model.base_model.model[4].modules_to_save["default"].bias.add_(0.5)
    adapted = model(X)
    merged = model.merge_and_unload(progressbar=True)
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
    assert [type(m) for m in merged] == [type(m) for m in base]
    torch.testing.assert_close(merged(X), adapted, atol=1e-5, rtol=1e-5)

    model = get_peft_model(copy.deepcopy(base), toy())
    model.merge_adapter()
    plain = model.unload()  # unmerges before unwrapping
    torch.testing.assert_close(plain(X), reference, atol=1e-6, rtol=1e-6)


def test_safe_merge_failure_leaves_model_unchanged():
    model = get_peft_model(mlp(), toy())
    with torch.no_grad():
        model.base_model.model[2].toy_scale["default"][0] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match="NaN"):
        model.merge_and_unload(safe_merge=True)
    assert_unchanged(model, before)


# ----------------------------------------------------------------------------- failed loads
def saved(tmp_path, **kw):
    model = get_peft_model(mlp(), toy(**kw))
    model.save_pretrained(tmp_path)
    return model


def test_shape_mismatch_names_key_and_shapes_and_changes_nothing(tmp_path):
    saved(tmp_path)
    other = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3))
    before = snapshot(other)
    with pytest.raises(
        CheckpointShapeError, match=r"'base_model.model.2.toy_scale' has shape \(8,\).*shape \(5,\)"
    ):
        PeftModel.from_pretrained(other, tmp_path)
    assert_unchanged(other, before)


def test_load_adapter_failure_leaves_peft_model_unchanged(tmp_path):
    saved(tmp_path)
    target = get_peft_model(
        nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3)),
        toy(target_modules=["4"]),
    )
    before = snapshot(target)
    with pytest.raises(CheckpointShapeError):
        target.load_adapter(tmp_path, adapter_name="bad")
    assert_unchanged(target, before)
    assert list(target.peft_config) == ["default"]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_safetensors_is_reported_and_changes_nothing(tmp_path, damage):
    saved(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(
        {"truncate": data[: len(data) // 2], "garbage": b"\x00garbage" * 10, "empty": b""}[damage]
    )
    base = mlp()
    before = snapshot(base)
    with pytest.raises(CorruptCheckpointError, match="truncated or corrupt"):
        PeftModel.from_pretrained(base, tmp_path)
    assert_unchanged(base, before)


def test_missing_plugin_and_missing_peft_type(tmp_path, registry_with_only):
    registry_with_only("peft_toy.plugin")
    saved(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    data = json.loads(config_path.read_text())
    base = mlp()
    before = snapshot(base)
    config_path.write_text(json.dumps(data | {"peft_type": "LOKR"}))
    with pytest.raises(UnknownMethodError, match="pip install peft-lokr"):
        PeftModel.from_pretrained(base, tmp_path)
    data.pop("peft_type")
    config_path.write_text(json.dumps(data))
    with pytest.raises(Exception, match="no 'peft_type'"):
        PeftModel.from_pretrained(base, tmp_path)
    assert_unchanged(base, before)


def test_checkpoint_from_another_model_is_refused(tmp_path):
    saved(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    from safetensors.torch import save_file

    save_file({"base_model.model.unrelated.toy_scale": torch.zeros(3)}, path)
    base = mlp()
    before = snapshot(base)
    with pytest.raises(AdapterLoadError, match="None of the 1 checkpoint tensors"):
        PeftModel.from_pretrained(base, tmp_path)
    assert_unchanged(base, before)


def test_pickle_only_loads_when_asked(tmp_path):
    model = get_peft_model(mlp(), toy())
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").exists()
    with pytest.raises(AdapterLoadError, match="allow_pickle=True"):
        PeftModel.from_pretrained(mlp(), tmp_path)
    loaded = PeftModel.from_pretrained(mlp(), tmp_path, allow_pickle=True)
    torch.testing.assert_close(loaded(X), model(X))


def test_save_is_atomic(tmp_path, monkeypatch):
    import peft_core.peft_model as pm

    model = get_peft_model(mlp(), toy())
    model.save_pretrained(tmp_path / "existing")
    original = (tmp_path / "existing" / "adapter_model.safetensors").read_bytes()
    (tmp_path / "existing" / "trainer_state.json").write_text("{}")

    def exploding(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pm, "save_weights", exploding)
    with torch.no_grad():
        model.base_model.model[0].toy_scale["default"].add_(1)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "new")
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "existing")
    assert not (tmp_path / "new").exists()
    assert (tmp_path / "existing" / "adapter_model.safetensors").read_bytes() == original
    assert (tmp_path / "existing" / "trainer_state.json").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no staging leftovers


# ----------------------------------------------------------------------------- targeting errors
def test_targets_that_match_nothing():
    with pytest.raises(TargetModulesError, match=r"matched no module"):
        get_peft_model(mlp(), toy(target_modules=["q_proj"]))
    with pytest.warns(UserWarning, match=r"\['nope'\] matched no module"):
        get_peft_model(mlp(), toy(target_modules=["0", "nope"]))


def test_unsupported_module_type_is_named():
    with pytest.raises(TargetModulesError, match=r"torch.nn.modules.activation.ReLU.*TOY cannot wrap"):
        get_peft_model(mlp(), toy(target_modules=["0", "1"]))


def test_only_adapter_parameters_train():
    model = get_peft_model(mlp(), toy(modules_to_save=["4"], target_modules=["0"]))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {
        "base_model.model.0.toy_scale.default",
        "base_model.model.4.modules_to_save.default.weight",
        "base_model.model.4.modules_to_save.default.bias",
    }


def test_print_trainable_parameters(capsys):
    model = get_peft_model(mlp(), toy(target_modules=["0"]))
    model.print_trainable_parameters()
    total = sum(p.numel() for p in model.parameters())
    assert (
        capsys.readouterr().out.strip()
        == f"trainable params: 8 || all params: {total:,d} || trainable%: {100 * 8 / total:.4f}"
    )


def test_inject_adapter_in_model_and_state_dict_helpers():
    model = inject_adapter_in_model(toy(), mlp())
    assert isinstance(model[0], AdapterLayer)
    state = get_peft_model_state_dict(model)
    assert set(state) == {"0.toy_scale", "2.toy_scale"}
    fresh = inject_adapter_in_model(toy(init_weights=True), mlp())
    result = set_peft_model_state_dict(fresh, state)
    assert result.unexpected_keys == [] and result.missing_keys == []
    torch.testing.assert_close(fresh(X), model(X))
    # checkpoints written by a PeftModel carry the prefix and load into a bare model too
    prefixed = {f"base_model.model.{k}": v for k, v in state.items()}
    assert set_peft_model_state_dict(inject_adapter_in_model(toy(), mlp()), prefixed).unexpected_keys == []


# ----------------------------------------------------------------------------- hub
def test_from_pretrained_with_a_hub_id_from_the_local_cache(tmp_path, monkeypatch):
    saved(tmp_path / "src")
    cache = tmp_path / "hub"
    snapshot_dir = (
        cache / "models--someone--toy-adapter" / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    )
    snapshot_dir.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (snapshot_dir / name).write_bytes((tmp_path / "src" / name).read_bytes())
    (cache / "models--someone--toy-adapter" / "refs").mkdir()
    (cache / "models--someone--toy-adapter" / "refs" / "main").write_text(snapshot_dir.name)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    loaded = PeftModel.from_pretrained(mlp(), "someone/toy-adapter", cache_dir=str(cache))
    expected = PeftModel.from_pretrained(mlp(), tmp_path / "src")
    torch.testing.assert_close(loaded(X), expected(X), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="someone/absent"):
        PeftModel.from_pretrained(mlp(), "someone/absent", cache_dir=str(cache))


def test_push_to_hub_uploads_the_saved_folder(monkeypatch):
    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls["repo"] = repo_id

        def upload_folder(self, repo_id, folder_path, commit_message, revision=None):
            calls["files"] = sorted(os.listdir(folder_path))
            return "ok"

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    model = get_peft_model(mlp(), toy())
    assert model.push_to_hub("me/adapter", token="t") == "ok"
    assert calls == {
        "token": "t",
        "repo": "me/adapter",
        "files": ["README.md", "adapter_config.json", "adapter_model.safetensors"],
    }


def test_adapters_added_to_an_eval_model_are_in_eval_mode():
    """Otherwise a new adapter's dropout would be active at inference."""
    model = get_peft_model(mlp(), toy(target_modules=["0"])).eval()
    model.add_adapter("b", toy(target_modules=["0", "2"], modules_to_save=["4"]))
    assert not any(m.training for m in model.modules())
    model.train()
    model.add_adapter("c", toy(target_modules=["2"]))
    assert all(m.training for m in model.modules())


def test_adapters_added_while_disabled_stay_disabled():
    base = mlp()
    expected = copy.deepcopy(base)(X)
    model = get_peft_model(base, toy(target_modules=["0"]))
    model.base_model.disable_adapter_layers()
    model.add_adapter("b", toy(target_modules=["0", "2"], modules_to_save=["4"]))
    with torch.no_grad():
        model.base_model.model[4].modules_to_save["b"].weight.add_(1.0)
    model.set_adapter("b")
    torch.testing.assert_close(model(X), expected, rtol=0, atol=0)
    model.base_model.enable_adapter_layers()
    assert not torch.allclose(model(X), expected)


@pytest.mark.parametrize("name", ["half", "copy", "to", "a.b", ""])
def test_adapter_names_that_cannot_be_container_keys_are_refused(name):
    model = get_peft_model(mlp(), toy(), "default")
    with pytest.raises(ValueError, match="choose another name|without dots"):
        model.add_adapter(name, toy())
    assert list(model.peft_config) == ["default"]
