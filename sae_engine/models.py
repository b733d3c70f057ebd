"""Loading causal LMs: an embedded model (see `sae_engine.embedded`), a local folder, or a cached Hub id.

Nothing here touches the network: a model that is neither embedded, nor a folder, nor already in the
local Hugging Face cache is refused with an error that says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from sae_engine.embedded import DEFAULT_MODEL, EMBEDDED, SMOLLM2, EmbeddedModelError, embedded, model_dir

# A tiny random Llama with SmolLM2's tokenizer, built once into `<data_dir>/models/` (the `tiny` preset, tests).
TINY_MODEL = "tiny-llama"
# The paper's hooked depths: layers 0, 8, 17, 26 and 35 of Qwen2.5-3B's 36, as fractions of the last layer.
PAPER_DEPTHS: tuple[float, ...] = (0.0, 8 / 35, 17 / 35, 26 / 35, 1.0)


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
        return layer_preset(self.n_layers)

    @property
    def eos_ids(self) -> set[int]:
        """Every token that ends an answer: the tokenizer's EOS and the generation config's (ChatML: <|im_end|>)."""
        config = self.model.generation_config
        eos = getattr(config, "eos_token_id", None) if config is not None else None
        ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        return {int(i) for i in ids if i is not None}


def layer_preset(n_layers: int, depths: tuple[float, ...] = PAPER_DEPTHS) -> tuple[int, ...]:
    """Layers at relative `depths` of a model with `n_layers` (the paper's five by default)."""
    last = n_layers - 1
    return tuple(sorted({round(last * depth) for depth in depths}))


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@cache
def cpu_supports_bf16() -> bool:
    """Whether the CPU multiplies bf16 natively (read once: the pipeline asks per encoded chunk)."""
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


def embedded_model_dir(data_dir: Path, name: str = SMOLLM2.name) -> Path:
    """An embedded model's de-quantised folder (default SmolLM2: the tiny test models borrow its tokenizer)."""
    model = embedded(name)
    if model is None:
        raise ModelLoadError(f"{name!r} is not an embedded model; embedded: {', '.join(EMBEDDED)}")
    try:
        return model_dir(model, data_dir)
    except EmbeddedModelError as exc:
        raise ModelLoadError(str(exc)) from exc


def model_source(name: str, data_dir: Path) -> tuple[str, str]:
    """(path or Hub id to load from, canonical model name).

    An embedded model loads from its de-quantised folder under its Hub id; a bare name with a folder
    under `<data_dir>/models/` (e.g. the `tiny` preset's `tiny-llama`) loads from there under that name."""
    model = embedded(name)
    if model is not None:
        return str(embedded_model_dir(data_dir, model.name)), model.hf_id
    if name == TINY_MODEL:
        return str(tiny_model_dir(data_dir)), name
    local = Path(data_dir) / "models" / name
    if "/" not in name and (local / "config.json").is_file():
        return str(local), name
    return name, name


def model_config(name: str, data_dir: Path) -> tuple[str, PretrainedConfig]:
    """(canonical name, config) of a model without loading its weights; a model that cannot be used is refused."""
    source, canonical = model_source(name, data_dir)
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"unknown model {name!r}: not an embedded model ({', '.join(EMBEDDED)}), not a model folder, and not in the"
            " local Hugging Face cache (nothing is downloaded at run time)"
        ) from exc
    if not isinstance(getattr(config, "num_hidden_layers", None), int):
        raise ModelLoadError(f"model {name!r} ({type(config).__name__}) is not a decoder with numbered layers")
    return canonical, config


def load_model(
    name: str = DEFAULT_MODEL, data_dir: Path | None = None, device: str = "auto", dtype: str = "auto"
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
    _contiguous_head_input(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, name=canonical, device=torch_device, dtype=torch_dtype)


def _contiguous_head_input(model: PreTrainedModel) -> None:
    """Feed the LM head a contiguous tensor.

    transformers slices the last position (`logits_to_keep`) out of the hidden states; on the CPU, a bf16
    matmul of that strided slice falls back to a batched product that copies the whole (vocab x d_model)
    head once per row: 36 s instead of 4 s for a batch of 32 prompts on Qwen2.5-0.5B (151,936 x 896).
    """
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]))


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


def tiny_model_dir(data_dir: Path) -> Path:
    """The tiny random Llama's folder, saved once (written beside and renamed)."""
    import shutil

    target = Path(data_dir) / "models" / TINY_MODEL
    if (target / "config.json").is_file():
        return target
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir(Path(data_dir)))
    model = from_config(tiny_llama_config(tokenizer), seed=0).float()
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.replace(target)
    return target


def from_config(config, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised model built from a config (tests and speed benchmarks)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.eval().requires_grad_(False)
    return model
