"""SAE checkpoints: SAELens folders (read and write) and the Safe-SAIL release's `ckpt_layer{L}.pt` (read).

A SAELens folder holds `cfg.json` and `sae_weights.safetensors` with exactly W_enc, W_dec,
b_enc, b_dec (SAELens's loader rejects extra tensors), plus optional `sparsity.safetensors`.
Our own keys (training metrics, activation scale) go into `cfg.json`'s `metadata`.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sae_engine.topk import TopKSAE

SAE_LENS_VERSION = "6.54.12"
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
WEIGHT_NAMES = ("W_enc", "W_dec", "b_enc", "b_dec")


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, of the wrong shape or made for another model."""


@dataclass
class LoadedSAE:
    sae: TopKSAE
    hook_name: str
    model_name: str | None
    metadata: dict
    log_density: torch.Tensor | None = None


def save_saelens(sae: TopKSAE, folder: Path, hook_name: str, model_name: str, metadata: dict | None = None) -> Path:
    """Write `sae` as a SAELens folder; written beside the target and renamed, so a crash leaves no half folder."""
    folder = Path(folder)
    meta = {**getattr(sae, "metadata", {}), **(metadata or {})}
    cfg = {
        "architecture": "topk",
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "k": sae.k,
        "dtype": str(sae.W_enc.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "rescale_acts_by_decoder_norm": False,
        "metadata": {
            "sae_lens_version": SAE_LENS_VERSION,
            "sae_lens_training_version": None,
            "model_name": model_name,
            "hook_name": hook_name,
            "hook_head_index": None,
            "context_size": meta.pop("context_size", 128),
            "prepend_bos": True,
            "exclude_special_tokens": True,
            "dataset_path": meta.pop("dataset_path", "starmap-corpus"),
            "model_from_pretrained_kwargs": {},
            "trained_with": "starmap",
            **_json_safe(meta),
        },
    }
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    tensors = {name: getattr(sae, name).detach().contiguous().cpu() for name in WEIGHT_NAMES}
    save_file(tensors, partial / WEIGHTS_FILE)
    density = getattr(sae, "feature_density", None)
    if density is not None:
        save_file({"sparsity": torch.log10(density.float().clamp_min(1e-10))}, partial / SPARSITY_FILE)
    (partial / CFG_FILE).write_text(json.dumps(cfg, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    partial.replace(folder)
    return folder


def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _topk_k(cfg: dict, folder: Path) -> int:
    if cfg.get("architecture") == "topk" and "k" in cfg:
        return int(cfg["k"])
    # SAELens < 6 wrote TopK SAEs as architecture "standard" with activation_fn "topk".
    if cfg.get("activation_fn") == "topk" or cfg.get("activation_fn_str") == "topk":
        kwargs = cfg.get("activation_fn_kwargs") or {}
        if "k" in kwargs:
            return int(kwargs["k"])
    raise CheckpointError(f"{folder / CFG_FILE}: not a TopK SAE (architecture {cfg.get('architecture')!r}) or k missing")


def load_saelens(
    folder: Path, expect_d_in: int | None = None, expect_model: str | None = None, device: str = "cpu"
) -> LoadedSAE:
    """Read a SAELens TopK folder, ours or anyone's, into a `TopKSAE` that encodes identically."""
    folder = Path(folder)
    cfg_path, weights_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    for path in (cfg_path, weights_path):
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({exc})") from exc
    k = _topk_k(cfg, folder)
    for key, supported in (("normalize_activations", "none"), ("rescale_acts_by_decoder_norm", False)):
        if cfg.get(key, supported) not in (supported, None):
            raise CheckpointError(f"{cfg_path}: {key}={cfg[key]!r} is not supported (only {supported!r})")
    try:
        weights = load_file(weights_path)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights_path}: unreadable or truncated ({exc})") from exc
    missing = [n for n in WEIGHT_NAMES if n not in weights]
    if missing:
        raise CheckpointError(f"{weights_path}: missing tensors {missing}")
    d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    _check_shapes(weights_path, weights, d_in, d_sae)
    meta = cfg.get("metadata") or {k_: cfg[k_] for k_ in ("model_name", "hook_name") if k_ in cfg}
    _check_target(weights_path, d_in, meta.get("model_name"), expect_d_in, expect_model)
    b_enc = weights["b_enc"].float()
    if not cfg.get("apply_b_dec_to_input", True):
        # W_enc x + b_enc == W_enc (x - b_dec) + (b_enc + W_enc b_dec): same encoding in our centred form.
        b_enc = b_enc + weights["b_dec"].float() @ weights["W_enc"].float()
    sae = TopKSAE(d_in, d_sae, k)
    with torch.no_grad():
        sae.W_enc.copy_(weights["W_enc"])
        sae.W_dec.copy_(weights["W_dec"])
        sae.b_enc.copy_(b_enc)
        sae.b_dec.copy_(weights["b_dec"])
    sae.metadata = dict(meta)
    log_density = None
    if (folder / SPARSITY_FILE).is_file():
        log_density = load_file(folder / SPARSITY_FILE).get("sparsity")
    return LoadedSAE(sae.to(device), meta.get("hook_name") or cfg.get("hook_name", ""), meta.get("model_name"), meta, log_density)


def _check_shapes(path: Path, weights: dict[str, torch.Tensor], d_in: int, d_sae: int) -> None:
    expected = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise CheckpointError(f"{path}: {name} has shape {tuple(weights[name].shape)}, expected {shape}")


def _check_target(path: Path, d_in: int, model_name: str | None, expect_d_in: int | None, expect_model: str | None) -> None:
    if expect_d_in is not None and d_in != expect_d_in:
        raise CheckpointError(f"{path}: SAE input width {d_in} does not match the model's {expect_d_in}")
    if expect_model and model_name and model_name != expect_model:
        raise CheckpointError(f"{path}: SAE was trained for {model_name!r}, not {expect_model!r}")


def load_safe_sail(path: Path, layer: int, k: int = 200, component: int = 0, expect_d_in: int | None = None) -> LoadedSAE:
    """Read a Safe-SAIL `ckpt_layer{L}.pt` (OpenAI sparse_autoencoder layout, C stacked components).

    The release centres with a pre-encoder bias and decodes with a separate post-decoder bias.
    With b_dec := post bias, b_enc absorbs W_enc (post - pre), so the encoding is unchanged.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for corrupt pickles and zips
        raise CheckpointError(f"{path}: unreadable or truncated ({type(exc).__name__}: {exc})") from exc
    required = ("pre_encoder_bias._bias_reference", "encoder.weight", "encoder.bias", "decoder.weight")
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(f"{path}: not a Safe-SAIL checkpoint, missing {missing}")
    W = state["encoder.weight"][component].float()  # (d_sae, d_in)
    d_sae, d_in = W.shape
    pre_bias = state["pre_encoder_bias._bias_reference"][component].float()
    post_bias = state.get("post_decoder_bias._bias_reference", state["pre_encoder_bias._bias_reference"])[component].float()
    decoder = state["decoder.weight"][component].float()  # (d_in, d_sae)
    if tuple(decoder.shape) != (d_in, d_sae) or pre_bias.shape != (d_in,):
        raise CheckpointError(f"{path}: inconsistent shapes encoder {tuple(W.shape)}, decoder {tuple(decoder.shape)}")
    _check_target(path, d_in, None, expect_d_in, None)
    sae = TopKSAE(d_in, d_sae, k)
    with torch.no_grad():
        sae.W_enc.copy_(W.t())
        sae.W_dec.copy_(decoder.t())
        sae.b_enc.copy_(state["encoder.bias"][component].float() + W @ (post_bias - pre_bias))
        sae.b_dec.copy_(post_bias)
    hook = f"blocks.{layer}.hook_mlp_out"
    meta = {"model_name": "Qwen/Qwen2.5-3B-Instruct", "hook_name": hook, "source": "safe-sail", "checkpoint": str(path)}
    sae.metadata = meta
    return LoadedSAE(sae, hook, meta["model_name"], meta)
