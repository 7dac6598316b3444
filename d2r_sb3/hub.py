"""Download published policies from the Hugging Face Hub and load them (safe format only: nothing is unpickled).

The public home of :func:`load_from_hub` and :func:`download_policy`; the code lives in
:mod:`d2r_sb3.serialization.hub` (downloads) and :mod:`d2r_sb3.serialization.loading` (loading). A published repo
(``<org>/<algo>-<EnvName>``, e.g. ``d2r-sb3/d2r-MT10-rand``) holds the SB3 zip for resuming training plus the
safe policy files; :func:`download_policy` fetches only the safe files and small records, through the regular
Hub cache. The default pretrained policy :data:`DEFAULT_REPO_ID` ships inside the package
(:data:`PRETRAINED_CACHE`), so it loads without network access.

Example::

    from d2r_sb3.hub import load_from_hub

    policy = load_from_hub("d2r-sb3/d2r-MT10-rand")
    env = policy.make_env()
    actions, _ = policy.predict(env.reset())
"""

from d2r_sb3.serialization.hub import (
    DEFAULT_ORG,
    DEFAULT_REPO_ID,
    DOWNLOAD_PATTERNS,
    PRETRAINED_CACHE,
    HubPolicyNotFoundError,
    download_policy,
    is_repo_id,
    repo_id_for,
)
from d2r_sb3.serialization.loading import load_from_hub

__all__ = [
    "DEFAULT_ORG",
    "DEFAULT_REPO_ID",
    "DOWNLOAD_PATTERNS",
    "PRETRAINED_CACHE",
    "HubPolicyNotFoundError",
    "download_policy",
    "is_repo_id",
    "load_from_hub",
    "repo_id_for",
]
