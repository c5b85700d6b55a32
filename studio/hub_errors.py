"""One sentence for each way the Hugging Face Hub can refuse a model or a dataset file.

huggingface_hub raises many types (and plain network errors get through it). Models (studio/sources.py) and
dataset files (studio/text_sources.py) are fetched through it alike, so they are explained alike. A sentence names
the repository as the user wrote it and what to do; the token is never in it (huggingface_hub sends it in a header,
never in the URL that its messages quote).
"""

from __future__ import annotations


def hub_failure(subject: str, exc: Exception, path: str | None = None, path_hint: str = "") -> str:
    """Why `subject` ("Model 'org/name@rev'", "dataset 'org/name'") could not be fetched, as one sentence
    without a full stop. `path` is the file asked for, when there is one; `path_hint` says where to find its
    right name."""
    from huggingface_hub import errors

    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, errors.GatedRepoError):  # before its parent class, RepositoryNotFoundError
        return f"{subject} is gated: accept its terms on the Hub, then set HF_TOKEN to a token of that account"
    if isinstance(exc, errors.RepositoryNotFoundError):
        return f"{subject} was not found on the Hub (or is private: set HF_TOKEN)"
    if isinstance(exc, errors.DisabledRepoError):
        return f"{subject} has been disabled on the Hub"
    if isinstance(exc, errors.RevisionNotFoundError):
        return f"{subject} has no such revision (the part after @)"
    if isinstance(exc, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)):
        # LocalEntryNotFoundError before its parent class, EntryNotFoundError
        missing = f"file {path!r} of {subject}" if path else subject
        return (f"{missing} is not in the local Hub cache and could not be downloaded (Hub access is off, "
                f"HF_HUB_OFFLINE=1, or there is no network); download it, or give a local path")
    if isinstance(exc, errors.EntryNotFoundError) and path:
        return f"{subject} has no file {path!r}" + (f": {path_hint}" if path_hint else "")
    if status == 401:
        return (f"{subject} could not be fetched: the Hub refused the token (HF_TOKEN or the saved login); renew it, "
                f"or unset it to read public repositories")
    first_line = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    cause = f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__
    return (f"{subject} could not be fetched ({cause}); check the network connection, or download it and give a "
            f"local path")
