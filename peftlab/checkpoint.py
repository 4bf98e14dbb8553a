"""Atomic writes of weights (safetensors) and JSON: temp file in the same folder, then rename."""

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from peftlab.errors import PeftlabError


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; a result file is as readable as any other
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_weights(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    # contiguous copies: safetensors refuses views and tensors that share storage (tied weights)
    data = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    _atomic(Path(path), lambda tmp: save_file(data, tmp))


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise PeftlabError(f"weights file '{path}' does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise PeftlabError(f"'{path}' is not a valid safetensors file ({e}); re-run training to rewrite it") from e


def save_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def atomic_write_text(path: str | Path, text: str) -> None:
    _atomic(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def load_json(path: str | Path) -> dict:
    return _parse(path, json.loads, json.JSONDecodeError, "JSON", "'{path}' does not exist; is this a peftlab run directory?")


def load_yaml(path: str | Path, what: str = "file"):
    """A YAML document, with errors that name the file (`what`: e.g. 'method file')."""
    import yaml

    return _parse(path, yaml.safe_load, yaml.YAMLError, "YAML", f"{what} '{{path}}' does not exist")


def _parse(path: str | Path, parse, error: type[Exception], fmt: str, missing: str):
    path = Path(path)
    try:
        return parse(path.read_text())
    except FileNotFoundError as e:
        raise PeftlabError(missing.format(path=path)) from e
    except error as e:
        raise PeftlabError(f"'{path}' is not valid {fmt} ({str(e).splitlines()[0]})") from e
