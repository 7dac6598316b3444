"""Download published policies from the Hugging Face Hub (safe format only: nothing is unpickled).

This module only downloads and checks files; :func:`d2r_sb3.serialization.loading.load_from_hub` loads them (the
public home of both is :mod:`d2r_sb3.hub`).

A published repo (``<org>/<algo>-<EnvName>``, e.g. ``d2r-sb3/d2r-MT10-rand``) holds the SB3 zip for resuming
training plus the safe policy files (``policy.safetensors`` + ``policy.json``, see
:mod:`d2r_sb3.serialization.safe_format`). :func:`download_policy` fetches only the safe files and the small
records next to them (results, config, model card), never the zip or the video, through the regular Hub cache,
so a second call works offline.

The default pretrained policy :data:`DEFAULT_REPO_ID` ships inside the package as a Hub-cache folder
(:data:`PRETRAINED_CACHE`), so ``load_from_hub("d2r-sb3/d2r-MT10-rand")`` works without network access.

Users import these names from :mod:`d2r_sb3.hub` (which has an example).
"""

from __future__ import annotations

import re
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from d2r_sb3.common.run_layout import RESULTS_FILE
from d2r_sb3.serialization.safe_format import POLICY_CONFIG_FILE, POLICY_WEIGHTS_FILE, check_policy_folder

__all__ = [
    "DEFAULT_ORG",
    "DEFAULT_REPO_ID",
    "DOWNLOAD_PATTERNS",
    "PRETRAINED_CACHE",
    "HubPolicyNotFoundError",
    "download_policy",
    "is_bundled",
    "is_repo_id",
    "repo_id_for",
]

DEFAULT_ORG = "d2r-sb3"
DEFAULT_REPO_ID = f"{DEFAULT_ORG}/d2r-MT10-rand"
PRETRAINED_CACHE = Path(__file__).resolve().parents[1] / "pretrained"
"""Hub-cache folder bundled with the package (``models--<org>--<name>/{refs/main, snapshots/<commit>/...}``)."""
DOWNLOAD_PATTERNS = [
    POLICY_CONFIG_FILE,
    POLICY_WEIGHTS_FILE,
    RESULTS_FILE,
    "config.yml",
    "env_kwargs.yml",
    "README.md",
]
"""What :func:`download_policy` fetches: the safe policy files and small records, not the zip or the video."""
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class HubPolicyNotFoundError(FileNotFoundError):
    """The repo is neither bundled nor cached and cannot be downloaded, or the Hub has no such repo.

    :param reason: ``"offline"`` (downloads disabled), ``"unreachable"`` (the Hub did not answer) or ``"no_repo"``
        (the Hub answered that the repo does not exist or is private).
    """

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def repo_id_for(algo: str, env_name: str, org: str = DEFAULT_ORG) -> str:
    """Hub repo id of a run: ``<org>/<algo>-<EnvName>`` (e.g. ``d2r-sb3/d2r-MT10-rand``).

    :param algo: registry name of the algorithm (``"d2r"``).
    :param env_name: zoo env name (``"MT10-rand"``, ``"MT50-fixed-mw3"``).
    :param org: Hub user or organisation.
    """
    return f"{org}/{algo}-{env_name}"


def is_repo_id(text: str) -> bool:
    """Whether ``text`` looks like a Hub repo id ``"org/name"`` (a local path may look like one too)."""
    return isinstance(text, str) and _REPO_ID.fullmatch(text) is not None


def _check_repo_id(repo_id: str) -> None:
    if not is_repo_id(repo_id):
        raise ValueError(f"Invalid Hub repo id {repo_id!r}: expected 'org/name', e.g. {DEFAULT_REPO_ID!r}.")


def is_bundled(folder: Path) -> bool:
    """Whether ``folder`` is inside the package's bundled pretrained cache (:data:`PRETRAINED_CACHE`)."""
    return folder.resolve().is_relative_to(PRETRAINED_CACHE.resolve())


def _from_bundle(repo_id: str, revision: str | None) -> Path | None:
    """The snapshot folder of ``repo_id`` in the package's bundled cache, if it is there."""
    if not (PRETRAINED_CACHE / f"models--{repo_id.replace('/', '--')}").is_dir():
        return None
    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=PRETRAINED_CACHE,
                local_files_only=True,
                allow_patterns=DOWNLOAD_PATTERNS,
            )
        )
    except LocalEntryNotFoundError:  # e.g. a revision that the bundled copy is not
        return None


def download_policy(
    repo_id: str,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool | None = None,
    use_bundled: bool = True,
) -> Path:
    """Download (or find in the cache) the safe policy files of a Hub repo and check them.

    The package's bundled copy (:data:`PRETRAINED_CACHE`) is tried first, then the Hugging Face cache
    (``cache_dir`` or ``HF_HUB_CACHE``), then the network unless offline.

    :param repo_id: ``"org/name"``, e.g. :data:`DEFAULT_REPO_ID`.
    :param revision: branch, tag or commit to pin (default: ``main``).
    :param cache_dir: Hugging Face cache folder (default: ``HF_HUB_CACHE``).
    :param local_files_only: only look in the caches (``None``: offline only when ``HF_HUB_OFFLINE=1``).
    :param use_bundled: look in the bundled pretrained folder first (``False``: always ask the Hub cache/network,
        e.g. to get a newer ``main``).
    :return: the snapshot folder holding ``policy.json`` and ``policy.safetensors``.
    :raises HubPolicyNotFoundError: (a :class:`FileNotFoundError`) if the policy is not cached and cannot be
        downloaded (offline, Hub unreachable), or the Hub has no such repo.
    :raises FileNotFoundError: if the repo has no safe policy files.
    :raises ValueError: on an invalid repo id or corrupted files.
    :raises OSError: on other Hub errors (gated repo, revision not found, failed download).
    """
    _check_repo_id(repo_id)
    folder = _from_bundle(repo_id, revision) if use_bundled else None
    where = f"{repo_id!r}" + (f" (revision {revision!r})" if revision else "")
    if folder is None:
        folder = _from_cache_or_hub(repo_id, revision, cache_dir, local_files_only, where)
    missing = [name for name in (POLICY_CONFIG_FILE, POLICY_WEIGHTS_FILE) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"The Hub repo {where} has no {' / '.join(missing)} (looked in {folder}): it was not published in the "
            "safe policy format. Publish it with `python hub/push.py`, or download its SB3 zip yourself and load "
            "it with d2r_sb3.load_policy(path, allow_pickle=True) (a pickle: trusted sources only)."
        )
    try:
        check_policy_folder(folder)
    except ValueError as error:
        raise ValueError(f"The policy files of {where} are corrupted: {error}") from error
    return folder


def _from_cache_or_hub(
    repo_id: str,
    revision: str | None,
    cache_dir: str | Path | None,
    local_files_only: bool | None,
    where: str,
) -> Path:
    """The snapshot folder from the Hugging Face cache or the Hub, with the Hub's errors said for people."""
    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=bool(local_files_only),
                allow_patterns=DOWNLOAD_PATTERNS,
                library_name="d2r_sb3",
            )
        )
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as error:
        if local_files_only or constants.HF_HUB_OFFLINE:
            reason = "offline"
            why = "downloads are disabled (HF_HUB_OFFLINE=1 or local_files_only=True)"
            fix = "Download it once with network access (unset HF_HUB_OFFLINE)"
        else:
            reason = "unreachable"
            why = f"the Hub could not be reached ({error})"
            fix = "Check the network connection"
        raise HubPolicyNotFoundError(
            f"The policy {where} is not in the Hugging Face cache ({cache_dir or constants.HF_HUB_CACHE}) and "
            f"{why}. {fix}, or point HF_HUB_CACHE at the cache folder that holds it.",
            reason,
        ) from error
    except GatedRepoError as error:  # (a RepositoryNotFoundError: caught first)
        raise OSError(
            f"The Hub repo {repo_id!r} is gated: accept its conditions on huggingface.co and log in with "
            "`hf auth login`."
        ) from error
    except RepositoryNotFoundError as error:
        raise HubPolicyNotFoundError(
            f"The Hub repo {repo_id!r} does not exist or is private: check the id (published policies "
            f"are named <org>/<algo>-<EnvName>, e.g. {DEFAULT_REPO_ID!r}) or log in with `hf auth login`.",
            "no_repo",
        ) from error
    except RevisionNotFoundError as error:
        raise OSError(
            f"The Hub repo {repo_id!r} has no revision {revision!r} (branch, tag or commit)."
        ) from error
    except (HfHubHTTPError, EntryNotFoundError) as error:
        raise OSError(f"Downloading {where} from the Hugging Face Hub failed: {error}") from error
