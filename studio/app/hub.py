"""Push a finished merge to the Hugging Face Hub, with its model card.

The token is handed to huggingface_hub for this one call and nowhere else: it is not logged, not put in
any message (error texts are scrubbed of it), and not saved to the login cache or any file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from studio.errors import StudioError
from studio.sources import HUB_ID

REQUIRED = ("config.json", "README.md")


def files_to_push(folder: str | Path) -> list[str]:
    """The files a push uploads (every file of the merge, model card included), or why the folder is no merge."""
    folder = Path(folder)
    if not folder.is_dir():
        raise StudioError(f"{folder} is not a folder; pick a finished merge to push.")
    missing = [name for name in REQUIRED if not (folder / name).is_file()]
    if missing:
        raise StudioError(f"{folder} has no {' or '.join(missing)}: it is not a finished merge (merges write both).")
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def push_to_hub(folder: str | Path, repo_id: str, token: str, private: bool = True,
                log: Callable[[str], None] = print, endpoint: str | None = None) -> str:
    """Create `repo_id` (if needed) and upload the merge in `folder` to it. Returns the repo's URL."""
    from huggingface_hub import HfApi

    repo_id = repo_id.strip()
    if not HUB_ID.match(repo_id) or "/" not in repo_id:
        raise StudioError(f"Repository name {repo_id!r} should look like `your-name/model-name`.")
    if not token.strip():
        raise StudioError("A Hub token with write access is needed: paste one from huggingface.co/settings/tokens.")
    files = files_to_push(folder)
    api = HfApi(endpoint=endpoint, token=token.strip())
    try:
        log(f"Creating {'private' if private else 'public'} repository {repo_id}")
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        log(f"Uploading {len(files)} files from {folder}")
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message="Upload MoE merge from MoE Merge Studio")
    except Exception as exc:  # huggingface_hub raises many types; the user gets one readable line
        raise StudioError(_scrub(f"Push to {repo_id} failed ({type(exc).__name__}: {exc}). Check the token's "
                                 f"write access and the network connection.", token)) from None
    log(f"Pushed to {url}")
    return str(url)


def _scrub(text: str, token: str) -> str:
    return text.replace(token.strip(), "***") if token.strip() else text
