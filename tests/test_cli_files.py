"""``peft-core inspect`` and ``peft-core merge`` on real adapter directories."""

from __future__ import annotations

import io
import json
import os
import sys

import pytest
import torch

from peft_core import cli, get_peft_model

transformers = pytest.importorskip("transformers")
lora = pytest.importorskip("peft_lora")

IDS = torch.tensor([[3, 5, 7, 9]])


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        code = cli.main(list(argv))
    finally:
        sys.stdout, sys.stderr = old
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
    )
    base_dir = os.fspath(tmp_path / "base")
    transformers.LlamaForCausalLM(config).save_pretrained(base_dir)
    model = get_peft_model(
        transformers.LlamaForCausalLM.from_pretrained(base_dir),
        lora.LoraConfig(
            r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"
        ),
    )
    model.add_adapter("second", lora.LoraConfig(r=2, target_modules=["o_proj"], task_type="CAUSAL_LM"))
    adapter_dir = os.fspath(tmp_path / "adapter")
    model.save_pretrained(adapter_dir)
    with torch.no_grad():
        expected = model.eval()(input_ids=IDS).logits
    return base_dir, adapter_dir, expected


def test_inspect_reports_method_targets_ranks_size_and_plugin(saved):
    base_dir, adapter_dir, _ = saved
    code, out, err = run("inspect", adapter_dir, "--json")
    assert code == 0, err
    data = json.loads(out)
    first, second = data["adapters"]
    assert (first["subfolder"], second["subfolder"]) == (None, "second")
    assert first["method"] == "LORA" and first["plugin_installed"] and first["base_model"] == base_dir
    assert sorted(first["target_modules"]) == ["q_proj", "v_proj"]
    assert set(first["ranks"].values()) == {4} and set(second["ranks"].values()) == {2}
    # q_proj: A 4x16 + B 16x4; v_proj: A 4x16 + B 8x4 (one KV head of 8)
    assert first["parameters"] == 4 * 16 + 16 * 4 + 4 * 16 + 8 * 4
    assert first["file_size_bytes"] == os.path.getsize(os.path.join(adapter_dir, "adapter_model.safetensors"))
    code, text, _ = run("inspect", adapter_dir)
    assert code == 0 and "method          LORA" in text and "adapter second" in text


def test_inspect_names_a_missing_plugin(saved, tmp_path):
    _, adapter_dir, _ = saved
    config_path = os.path.join(adapter_dir, "adapter_config.json")
    config = json.load(open(config_path))
    config["peft_type"] = "NOT_A_METHOD"
    json.dump(config, open(config_path, "w"))
    code, out, _ = run("inspect", adapter_dir, "--json")
    entry = json.loads(out)["adapters"][0]
    assert code == 0 and not entry["plugin_installed"] and entry["plugin"] == "peft-not-a-method"
    code, _, err = run("inspect", os.fspath(tmp_path / "nowhere"))
    assert code == 1 and "error" in err


def test_merge_writes_a_plain_transformers_model_with_the_adapted_outputs(saved, tmp_path):
    base_dir, adapter_dir, expected_both = saved
    out_dir = os.fspath(tmp_path / "merged")
    code, out, err = run("merge", adapter_dir, out_dir, "--json")
    assert code == 0, err
    assert json.loads(out)["model_class"] == "LlamaForCausalLM"
    merged = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    from peft_core import PeftModel

    reference = PeftModel.from_pretrained(
        transformers.LlamaForCausalLM.from_pretrained(base_dir), adapter_dir
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=IDS).logits, reference(input_ids=IDS).logits, atol=1e-5, rtol=0
        )
    code, _, err = run(
        "merge", adapter_dir, os.fspath(tmp_path / "again"), "--base", os.fspath(tmp_path / "missing")
    )
    assert code == 1 and "error" in err and not os.path.exists(tmp_path / "again")
