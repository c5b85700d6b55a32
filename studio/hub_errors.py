"""One sentence for each way the Hugging Face Hub can refuse a model or a dataset file.

huggingface_hub raises many types (and plain network errors get through it). Models (studio/sources.py) and
dataset files (studio/text_sources.py) are fetched through it alike, so they are explained alike. A sentence names
the repository as the user wrote it and what to do; the token is never in it (huggingface_hub sends it in a header,
never in the URL that its messages quote).
"""

from __future__ import annotations


def hub_failure(subject: str, exc: Exception, revision: str | None = None, path: str | None = None,
                path_hint: str = "") -> str:
    """Why `subject` ("Model 'org/name@rev'", "dataset 'org/name'") could not be fetched, as one sentence
    without a full stop. `revision` is the one asked for; `path` the file asked for, when there is one;
    `path_hint` says where to find its right name."""
    from huggingface_hub import errors

    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, errors.GatedRepoError):  # before its parent class, RepositoryNotFoundError
        return f"{subject} is gated: accept its terms on the Hub, then set HF_TOKEN to a token of that account"
    if isinstance(exc, errors.RepositoryNotFoundError):
        return f"{subject} was not found on the Hub (or is private: set HF_TOKEN)"
    if isinstance(exc, errors.DisabledRepoError):
        return f"{subject} has been disabled on the Hub"
    if isinstance(exc, errors.RevisionNotFoundError):
        return f"{subject} has no revision {revision!r}" if revision else f"{subject} has no such revision"
    if isinstance(exc, errors.OfflineModeIsEnabled):
        return (f"{subject} cannot be looked up: Hub access is off (HF_HUB_OFFLINE=1); unset it, or give a local "
                f"path")
    if isinstance(exc, errors.IncompleteSnapshotError):  # before its parent class, LocalEntryNotFoundError
        return (f"{subject} is only partly in the local Hub cache (an interrupted download) and the Hub is out of "
                f"reach; download it again with network access, or give a local path")
    if isinstance(exc, errors.LocalEntryNotFoundError):  # before its parent class, EntryNotFoundError
        missing = f"file {path!r} of {subject}" if path else subject
        return (f"{missing} is not in the local Hub cache and could not be downloaded (Hub access is off, "
                f"HF_HUB_OFFLINE=1, or there is no network); download it, or give a local path")
    if isinstance(exc, errors.EntryNotFoundError):
        if path:
            return f"{subject} has no file {path!r}" + (f": {path_hint}" if path_hint else "")
        return (f"{subject} lacks a file the studio reads ({_first_line(exc)}): a transformers model holds "
                f"config.json and its weights")
    if status == 401:
        return (f"{subject} could not be fetched: the Hub refused the token (HF_TOKEN or the saved login); renew it, "
                f"or unset it to read public repositories")
    line = _first_line(exc)
    cause = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
    return (f"{subject} could not be fetched ({cause}); check the network connection, or download it and give a "
            f"local path")


def _first_line(exc: Exception) -> str:
    """The first line of a message, at most 200 characters, with the Hub token (should one be quoted) hidden."""
    from huggingface_hub import get_token

    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    token = get_token()
    return (text.replace(token, "hf_***") if token else text)[:200]
