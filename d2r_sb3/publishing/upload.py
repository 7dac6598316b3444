"""Upload a staged folder to the Hugging Face Hub, in one commit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, constants, get_token

__all__ = ["push_to_hub"]


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
) -> Any:
    """Create the Hub repo if needed and upload a staged folder in one commit.

    :param folder: the staged folder (:func:`stage_repo`).
    :param repo_id: ``"org/name"``.
    :param token: Hugging Face token (default: ``HF_TOKEN`` or the token saved by ``hf auth login``).
    :param private: create the repo as private.
    :param revision: branch to commit to (default ``main``).
    :param commit_message: commit message.
    :return: huggingface_hub's ``CommitInfo``.
    :raises RuntimeError: without a token, or with ``HF_HUB_OFFLINE=1``.
    """
    if constants.HF_HUB_OFFLINE:
        raise RuntimeError("HF_HUB_OFFLINE=1 is set: unset it to upload to the Hugging Face Hub.")
    token = token or get_token()
    if not token:
        raise RuntimeError(
            "No Hugging Face token found: run `hf auth login`, set HF_TOKEN, or pass --token (a token with write "
            f"access to {repo_id.split('/')[0]!r})."
        )
    api = HfApi(token=token)
    api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        revision=revision,
        token=token,
        commit_message=commit_message or f"Upload {repo_id.split('/')[-1]} (d2r_sb3)",
    )
