"""Loading from local folders (the hub path, offline) and calibration sources on the real tokenizer."""

import pytest
import torch

from prune.recipe import CalibrationSpec
from runtime.calibration import CalibrationError, calibration_ids
from runtime.models import load


@pytest.mark.model
def test_local_folder_loads_like_a_hub_id(tmp_path, smollm2):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=smollm2.tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    smollm2.tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = load(str(tmp_path))
    assert loaded.roles.model_type == "llama" and loaded.roles.num_layers == 2
    assert loaded.dtype == torch.float32 and loaded.device.type == "cpu"
    assert not loaded.model.config.use_cache


@pytest.mark.model
def test_generated_calibration_is_seeded_and_needs_no_dataset(smollm2):
    spec = CalibrationSpec(source="generated", nsamples=2, seqlen=24, seed=3)
    first = calibration_ids(spec, smollm2.tokenizer, smollm2.model, batch_size=2)
    again = calibration_ids(spec, smollm2.tokenizer, smollm2.model, batch_size=2)
    assert first.shape == (2, 24) and first.dtype == torch.long
    assert torch.equal(first, again)
    assert (first[:, 0] == smollm2.tokenizer.bos_token_id).all()
    assert len(set(first[0].tolist())) > 5  # real text, not one repeated token


@pytest.mark.model
def test_c4_calibration_follows_the_reference_sampler(smollm2):
    spec = CalibrationSpec(source="c4", nsamples=3, seqlen=64, seed=0)
    ids = calibration_ids(spec, smollm2.tokenizer)
    assert ids.shape == (3, 64)
    assert torch.equal(ids, calibration_ids(spec, smollm2.tokenizer))
    other = calibration_ids(CalibrationSpec(source="c4", nsamples=3, seqlen=64, seed=1), smollm2.tokenizer)
    assert not torch.equal(ids, other)


def test_missing_offline_split_names_where_it_looked(data_dir):
    with pytest.raises(CalibrationError, match="wikitext2 train split not found offline"):
        calibration_ids(CalibrationSpec(source="wikitext2", nsamples=1, seqlen=8), tokenizer=None)
