"""A Hugging Face hub model id (OWNER/NAME) as a local directory: its snapshot in the hub cache.

huggingface_hub decides where the snapshot is (HF_HOME, HF_HUB_CACHE), whether to ask the hub
(HF_HUB_OFFLINE) and how to fall back to the cache when the hub cannot be reached, exactly as
transformers' `from_pretrained` does: a model cached once loads offline.
"""

from __future__ import annotations

import re
from pathlib import Path

from cairn.util.errors import CairnError

# OWNER/NAME and nothing else: a path with more parts, or one starting with "/" or ".", is only a path
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def looks_like_repo_id(text: str) -> bool:
    return bool(_REPO_ID.fullmatch(text)) and ".." not in text and not text.endswith(".")


def snapshot(repo_id: str) -> Path:
    """The directory of `repo_id`'s main revision in the hub cache, downloaded first when the hub is
    reachable; a one-line error when it is neither reachable nor cached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, IncompleteSnapshotError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError)

    where = f"{repo_id!r} does not exist as a local path, and as a Hugging Face model id"
    try:
        return Path(snapshot_download(repo_id, repo_type="model"))
    except IncompleteSnapshotError:
        raise CairnError(f"{where} its snapshot in the hub cache is incomplete and the hub cannot be reached: "
                         "download it again with network") from None
    except LocalEntryNotFoundError:
        raise CairnError(f"{where} it is not in the hub cache and the hub cannot be reached (offline or no "
                         "network): pass a run directory or a checkpoint, or download it with network") from None
    except (RepositoryNotFoundError, GatedRepoError):
        raise CairnError(f"{where} it is not on the hub (or it is private: log in with `hf auth login` or set "
                         "HF_TOKEN): pass a run directory, a checkpoint or a hub model id") from None
    except HfHubHTTPError as e:
        raise CairnError(f"{where} it could not be downloaded ({first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - the HTTP library's own types (a proxy refusing, say)
        if not is_network_error(e):
            raise
        raise CairnError(f"{where} it could not be downloaded: the hub cannot be reached ({first_line(e)})") from None


def is_network_error(e: BaseException) -> bool:
    """The hub could not be reached: offline mode, or a failure of the HTTP client huggingface_hub uses
    (httpx's or requests' types, by name: the client differs between huggingface_hub versions)."""
    names = {c.__name__ for c in type(e).__mro__}
    return isinstance(e, ConnectionError) or bool(names & {
        "OfflineModeIsEnabled", "TransportError", "NetworkError", "ProxyError", "TimeoutException", "ConnectError",
        "ConnectTimeout", "Timeout"})


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
