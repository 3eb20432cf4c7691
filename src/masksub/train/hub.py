"""``masksub export --push-to-hub <repo>``: the exported folder uploaded to a Hugging Face Hub model repository, from
which ``timm.create_model("hf-hub:<repo>", pretrained=True)`` and transformers' ``from_pretrained("<repo>")`` load
it. Everything that can be checked without the network (the repository name, a token, offline mode) is checked
before anything is written; a failed upload leaves the written folder as it is and says how to push it later."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .config import ConfigError


class HubPushError(RuntimeError):
    """The export was written and checked, but its upload to the Hub failed."""


def check_push(repo: str) -> None:
    """Refuse, before the export writes anything, a push that cannot work."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except Exception as e:  # HFValidationError: a name the Hub refuses
        raise ConfigError(f"--push-to-hub {repo!r} is not a Hub repository name (<user or org>/<name>): {e}") from e
    if constants.HF_HUB_OFFLINE:
        raise ConfigError("--push-to-hub needs the network, but HF_HUB_OFFLINE is set: unset it, or leave the push out")
    if huggingface_hub.get_token() is None:
        raise ConfigError(
            "--push-to-hub needs a Hugging Face token with write access: run `hf auth login`, or set HF_TOKEN; "
            "or leave the push out and upload the folder later"
        )


def push(folder: Path, repo: str, private: bool, source: Path, report: Callable[[str], None] = print) -> str:
    """Upload ``folder`` to the model repository ``repo`` (created, private with ``private``, if it does not exist;
    an existing one keeps its visibility); the commit's URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo, private=private or None, repo_type="model", exist_ok=True)
        info = api.upload_folder(
            repo_id=url.repo_id,
            folder_path=str(folder),
            repo_type="model",
            commit_message=f"masksub export of {source.name}",
        )
    except Exception as e:  # the network, the token's rights, the Hub's answer: the folder stays as written
        raise HubPushError(
            f"{folder} is written and checked, but pushing it to the Hub repository {repo} failed: {e}. "
            f"Push it later with: hf upload {repo} {folder} ."
        ) from e
    report(f"pushed {folder} to {info.commit_url}; load it with timm.create_model('hf-hub:{repo}', pretrained=True)")
    return info.commit_url


def local_folder(path: Path | str) -> Path:
    """``hf-hub:<repo>[@revision]`` (a model repository holding an exported folder) downloaded into the Hub's cache,
    its local folder; any other path as it is."""
    name = str(path)
    if not name.startswith("hf-hub:"):
        return Path(path)
    repo, _, revision = name.removeprefix("hf-hub:").partition("@")
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            repo, revision=revision or None, allow_patterns=["config.json", "model.safetensors", "README.md"]
        )
    except Exception as e:  # no network (and not cached), no such repository, no access
        raise ConfigError(
            f"cannot download {name} from the Hugging Face Hub: {e}. A private repository needs `hf auth login` or "
            "HF_TOKEN; offline, only what is in the Hub's cache can be read"
        ) from e
    if not (Path(folder) / "config.json").is_file():
        raise ConfigError(f"{name} holds no config.json: not a timm model folder (masksub export writes one)")
    return Path(folder)
