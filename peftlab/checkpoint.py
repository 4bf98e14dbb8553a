"""Atomic writes of weights (safetensors) and JSON: temp file in the same folder, then rename.

Only safetensors and JSON/YAML (safe loader) are ever read back: nothing here unpickles.
"""

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from peftlab.errors import PeftlabError, first_line


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
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise PeftlabError(f"the disk is full while writing '{path}' (the previous version is kept); "
                               "free some space and resume the run with --resume") from e
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# Weights saved with Python's pickle (torch.save): loading one can run any code its author put in it.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def pickle_refused(path: Path) -> PeftlabError:
    """The error for a pickle-based weights file, which peftlab never loads."""
    return PeftlabError(f"'{path}' is a pickle file, and pickle files can run arbitrary code when loaded, so peftlab "
                        "reads safetensors only; convert it to safetensors where you trust it (e.g. load it with "
                        "transformers and call save_pretrained, which writes model.safetensors)")


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


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], state: dict) -> None:
    """One file for a whole training state, so that one rename makes it current: the tensors,
    and the rest (position, counters, history) as JSON in the safetensors header."""
    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}  # no copies: they share no storage
    _atomic(Path(path), lambda tmp: save_file(data, tmp, metadata={"peftlab_state": json.dumps(state)}))


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = load_weights(path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "peftlab_state" not in meta:
        raise PeftlabError(f"'{path}' is a weights file, not a peftlab checkpoint")
    return tensors, json.loads(meta["peftlab_state"])


def check_free_space(folder: Path, need_bytes: int, what: str) -> None:
    """Refuse up front when `folder`'s disk cannot hold `need_bytes` (a write needs its temp copy too)."""
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise PeftlabError(f"not enough disk space in '{folder}' for {what}: about {need_bytes / 2**20:,.0f} MiB "
                           f"needed, {free / 2**20:,.0f} MiB free; free some space or choose another --out")


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


def missing_folders(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist yet, deepest first."""
    folder = Path(os.path.abspath(folder))
    return [p for p in (folder, *folder.parents) if not p.exists()]


@contextlib.contextmanager
def no_empty_folder(new: list[Path]):
    """If the block fails, remove each of the `new` folders (made for it: see `missing_folders`)
    that it left empty, deepest first: a run refused before it began leaves nothing behind, not
    even the runs/ folder it would have gone in."""
    try:
        yield
    except BaseException:
        for folder in new:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise


def read_utf8(path: Path) -> str:
    """A text file's contents; not UTF-8 names the first bad byte, its line and the fix."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # a byte-order mark is harmless: drop it
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise PeftlabError(f"'{path}' is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}); re-encode it "
                           f"as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path.name} > fixed{path.suffix}`") from None


def _parse(path: str | Path, parse, error: type[Exception], fmt: str, missing: str):
    path = Path(path)
    try:
        return parse(read_utf8(path))
    except FileNotFoundError as e:
        raise PeftlabError(missing.format(path=path)) from e
    except IsADirectoryError as e:
        raise PeftlabError(f"'{path}' is a folder, not a {fmt} file") from e
    except RecursionError as e:
        raise PeftlabError(f"'{path}' nests too deeply to be a config; is it the right file?") from e
    except error as e:
        mark = getattr(e, "problem_mark", None)  # YAML
        line, col = (mark.line + 1, mark.column + 1) if mark else (getattr(e, "lineno", None), getattr(e, "colno", 0))
        where = f" at line {line}, column {col}" if line else ""
        raise PeftlabError(f"'{path}' is not valid {fmt}{where} ({first_line(e)}); fix the syntax there") from e
