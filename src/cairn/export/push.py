"""`cairn push`: a run's Hugging Face export, model card included, uploaded to a hub model repo.

The export is written into a temporary directory that is removed whatever happens, and uploaded in
one commit (`upload_folder`): the repo holds the whole export or, when the upload fails, none of it.
The token is huggingface_hub's own (HF_TOKEN, or the one `hf auth login` saved).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cairn.checkpoint.hub import first_line, is_network_error, looks_like_repo_id
from cairn.export.card import LICENSE
from cairn.export.hf import export_hf
from cairn.util.errors import CairnError, option

NEEDS_NETWORK = "cairn push uploads to the Hugging Face hub and needs the network"


@dataclass
class Pushed:
    repo_id: str
    url: str  # the repo's page
    commit: str  # the upload's commit on the hub
    revision: str
    files: list[str]  # what was uploaded, relative to the repo's root


def offline() -> bool:
    from huggingface_hub import constants

    check = getattr(constants, "is_offline_mode", None)  # a function since huggingface_hub 1.0, a constant before
    return bool(check() if callable(check) else getattr(constants, "HF_HUB_OFFLINE", False))


def push(path: str | Path, repo_id: str, *, private: bool = False, revision: Optional[str] = None,
         message: Optional[str] = None, license: str = LICENSE) -> Pushed:
    """Export the model at `path` (a run directory or checkpoint) and upload it to `repo_id` (created if
    missing, `private` then), on branch `revision` (main by default, created from main if missing)."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    if not looks_like_repo_id(repo_id):
        raise CairnError(f"{repo_id!r} is not a hub model id: give it as OWNER/NAME (your user or organisation name, "
                         "then the model's)")
    if revision is not None and not revision.strip():
        raise CairnError(f"{option('revision')} is empty: name a branch, or leave it out for main")
    if offline():
        raise CairnError(f"{NEEDS_NETWORK}, and HF_HUB_OFFLINE is set: unset it, or use `cairn export` to write "
                         "the model to a local directory")
    token = get_token()
    if token is None:
        raise CairnError("no Hugging Face token: log in with `hf auth login`, or set HF_TOKEN to a token with "
                         "write access")
    with tempfile.TemporaryDirectory(prefix="cairn-push-") as tmp:
        out = export_hf(path, Path(tmp) / "export", repo_id=repo_id, license=license)
        files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
        api = HfApi(token=token)
        try:
            url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
            if revision not in (None, "main"):
                api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=out, repo_type="model", revision=revision,
                                     commit_message=message or f"cairn push: {Path(path).name}")
        except HfHubHTTPError as e:
            status = getattr(getattr(e, "response", None), "status_code", None)
            hint = (": check the token's write access to it (`hf auth login`, HF_TOKEN)"
                    if status in (401, 403) else "")
            raise CairnError(f"the hub refused the upload to {repo_id!r} ({first_line(e)}){hint}") from None
        except Exception as e:  # noqa: BLE001 - the HTTP library's own types, whichever huggingface_hub uses
            if not is_network_error(e):
                raise
            raise CairnError(f"{NEEDS_NETWORK}, and the hub cannot be reached ({first_line(e)}): nothing was "
                             "uploaded; try again with network") from None
    commit = getattr(info, "oid", None) or ""
    return Pushed(repo_id, str(url), commit, revision or "main", files)
