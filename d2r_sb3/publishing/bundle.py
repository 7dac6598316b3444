"""Bundle a run's policy-only files into the package's Hub-cache folder ``d2r_sb3/pretrained``.

:func:`d2r_sb3.hub.load_from_hub` reads that folder first, so the bundled policies load offline.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import warnings
from pathlib import Path

from d2r_sb3.publishing.staging import stage_repo
from d2r_sb3.serialization.hub import DEFAULT_REPO_ID, PRETRAINED_CACHE, is_repo_id

__all__ = ["BUNDLE_SIZE_WARNING", "package_pretrained"]

BUNDLE_SIZE_WARNING = 5 * 2**20  # the bundled pretrained folder ships in every wheel: keep it small


def _content_commit(folder: Path) -> str:
    """A 40-hex id for a snapshot: SHA-1 of its file names and contents (same files, same id)."""
    digest = hashlib.sha1()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def package_pretrained(
    model: str | Path,
    out_dir: str | Path = PRETRAINED_CACHE,
    *,
    repo_id: str = DEFAULT_REPO_ID,
    load_best: bool = False,
    video: bool = True,
    n_eval_episodes: int = 100,
    video_steps: int | None = None,
    video_tasks: int | list[str] = 3,
    device: str = "cpu",
    notes: str | None = None,
) -> Path:
    """Write a run's policy-only files into a Hugging Face cache layout that :mod:`d2r_sb3.hub` reads offline.

    Produces ``<out_dir>/models--<org>--<name>/refs/main`` (a 40-hex commit id derived from the content) and
    ``snapshots/<commit>/`` with ``policy.safetensors``, ``policy.json``, ``results.json``, ``config.yml``,
    ``env_kwargs.yml``, ``README.md``, ``learning_curve.png`` (if the run has an evaluation history) and a small
    ``replay.gif``. A previous bundle of the same repo id is replaced.

    :param model: the zoo run folder (or zip).
    :param out_dir: the cache folder (default: the package's ``d2r_sb3/pretrained``).
    :param repo_id: repo id the bundle answers to.
    :param load_best: bundle ``best_model.zip`` instead of the final model.
    :param video: include ``replay.gif``.
    :param n_eval_episodes: episodes per task if the run has no ``results.json``.
    :param video_steps: env steps in the GIF (default: one episode).
    :param video_tasks: number of tasks (the first ones) or their names in the GIF.
    :param device: torch device for evaluation and rendering.
    :param notes: Markdown for the model card's "About this run" section.
    :return: the snapshot folder.
    """
    if not is_repo_id(repo_id):
        raise ValueError(f"Invalid repo id {repo_id!r}: expected 'org/name'.")
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="d2r-bundle-") as tmp:
        staged = stage_repo(
            model,
            Path(tmp) / "stage",
            repo_id=repo_id,
            load_best=load_best,
            include_zip=False,
            video="gif" if video else None,
            n_eval_episodes=n_eval_episodes,
            video_steps=video_steps,
            video_tasks=video_tasks,
            device=device,
            notes=notes,
        )
        snapshot = _install(staged.folder, out_dir, repo_id)
    size = sum(p.stat().st_size for p in snapshot.iterdir())
    if size > BUNDLE_SIZE_WARNING:
        warnings.warn(
            f"The bundled policy is {size / 2**20:.1f} MiB; it ships in every wheel. Use a shorter GIF "
            "(video_steps) or video=False.",
            stacklevel=2,
        )
    return snapshot


def _install(staged: Path, out_dir: Path, repo_id: str) -> Path:
    """Copy a staged folder into ``out_dir`` as the Hub cache lays out ``repo_id`` (replacing a previous copy).

    :return: the snapshot folder ``<out_dir>/models--<org>--<name>/snapshots/<commit>``.
    """
    commit = _content_commit(staged)
    repo_folder = out_dir / f"models--{repo_id.replace('/', '--')}"
    if repo_folder.exists():
        shutil.rmtree(repo_folder)
    snapshot = repo_folder / "snapshots" / commit
    shutil.copytree(staged, snapshot)
    (repo_folder / "refs").mkdir(parents=True, exist_ok=True)
    (repo_folder / "refs" / "main").write_text(commit)
    return snapshot
