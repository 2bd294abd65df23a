"""PeftConfig: JSON round trip in the reference format, tolerant reading, clear errors."""

from __future__ import annotations

import json

import pytest
from attrs import define

from peft_core import ConfigError, PeftConfig, TaskType, UnknownMethodError
from peft_core.hub import CONFIG_NAME


@define(kw_only=True)
class DemoConfig(PeftConfig):
    PEFT_TYPE = "DEMO_CFG"
    r: int = 8
    target_modules: list[str] | str | None = None


def test_peft_type_is_filled_and_checked():
    assert DemoConfig().peft_type == "DEMO_CFG"
    with pytest.raises(ConfigError, match="DEMO_CFG"):
        DemoConfig(peft_type="LORA")


def test_task_type_accepts_enum_and_string_and_rejects_unknown():
    assert DemoConfig(task_type=TaskType.CAUSAL_LM).task_type == "CAUSAL_LM"
    assert DemoConfig(task_type="SEQ_CLS").task_type == "SEQ_CLS"
    with pytest.raises(ConfigError, match="CAUSAL_LM"):
        DemoConfig(task_type="CASUAL_LM")


def test_json_round_trip_is_sorted_and_complete(tmp_path):
    config = DemoConfig(r=4, target_modules={"v", "q"}, task_type="CAUSAL_LM", base_model_name_or_path="m")
    config.save_pretrained(tmp_path)
    text = (tmp_path / CONFIG_NAME).read_text()
    data = json.loads(text)
    assert list(data) == sorted(data)
    assert data["target_modules"] == ["q", "v"]
    assert {
        "peft_type",
        "task_type",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "auto_mapping",
    } <= set(data)
    again = DemoConfig.from_json_file(tmp_path / CONFIG_NAME)
    assert again.to_dict() == config.to_dict()


def test_unknown_keys_are_dropped_with_one_warning():
    data = DemoConfig().to_dict() | {"from_the_future": 1, "another_new_option": "x"}
    with pytest.warns(UserWarning, match=r"another_new_option.*from_the_future") as record:
        config = DemoConfig.from_dict(data)
    assert len([w for w in record if "Ignoring keys" in str(w.message)]) == 1
    assert config.r == 8


def test_missing_peft_type_is_a_clear_error(tmp_path):
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"r": 8}))
    with pytest.raises(ConfigError, match="no 'peft_type'"):
        PeftConfig.from_pretrained(tmp_path)


def test_unknown_peft_type_names_the_plugin_to_install(tmp_path, registry_with_only):
    registry_with_only()
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"peft_type": "LOHA", "r": 8}))
    with pytest.raises(UnknownMethodError, match=r"pip install peft-loha"):
        PeftConfig.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"peft_type": "SOMETHING_NEW"}))
    with pytest.raises(UnknownMethodError, match=r"pip install peft-something-new"):
        PeftConfig.from_pretrained(tmp_path)


def test_invalid_json_is_a_clear_error(tmp_path):
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        PeftConfig.from_pretrained(tmp_path)


def test_missing_directory_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError):
        PeftConfig.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        PeftConfig.from_pretrained(tmp_path)


def test_from_pretrained_resolves_the_registered_class(tmp_path):
    from peft_core.plugins import get_registry
    from peft_core.registry import MethodSpec
    from peft_core.tuner import AdapterModel

    registry = get_registry()
    if not registry.has_method("DEMO_CFG"):
        registry.register_method(
            MethodSpec(peft_type="DEMO_CFG", config_cls=DemoConfig, model_cls=AdapterModel, prefix="demo_")
        )
    DemoConfig(r=3).save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path, inference_mode=True)
    assert type(loaded) is DemoConfig and loaded.r == 3 and loaded.inference_mode


def test_lazy_plugin_config_import_error_names_the_package(registry_with_only):
    registry_with_only()
    import peft_core

    with pytest.raises(ImportError, match="pip install peft-oft"):
        from peft_core import OFTConfig  # noqa: F401
    with pytest.raises(AttributeError):
        peft_core.NotAThing  # noqa: B018


def test_unset_peft_version_is_the_reference_format_version_and_a_given_one_is_kept():
    from peft_core.config import REFERENCE_FORMAT_VERSION

    assert DemoConfig().peft_version == REFERENCE_FORMAT_VERSION == "0.21.2"
    assert DemoConfig(peft_version="0.13.0").peft_version == "0.13.0"
    assert DemoConfig.from_dict({"peft_version": None}).peft_version == "0.21.2"
    assert json.loads(DemoConfig().to_json_string())["peft_version"] == "0.21.2"
