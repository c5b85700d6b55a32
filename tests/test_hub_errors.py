"""Each of huggingface_hub's failures becomes one sentence, the same for a model and for a dataset's file, and the
token is never in it. The failures are huggingface_hub's own error types, built from real HTTP responses, raised
where the studio calls the Hub."""

import huggingface_hub
import pytest

from studio.errors import StudioError
from studio.sources import open_model
from studio.text_sources import read_text

TOKEN = "hf_doNotPrintThisToken1234567890"


def _hub_failure(kind: type, status: int) -> Exception:
    """huggingface_hub's own error of `kind`, as it raises it after an HTTP response of `status`."""
    import httpx

    request = httpx.Request("GET", "https://huggingface.co/me/arithmetic/resolve/main/train.jsonl")
    return kind(f"{status} Client Error.\nRepository Not Found for url: {request.url}.",
                response=httpx.Response(status, request=request))


FAILURES = [  # (the failure, the sentence about {subject}; {missing} is the file of a dataset, the model itself)
    (lambda e: _hub_failure(e.GatedRepoError, 403),
     "{subject} is gated: accept its terms on the Hub, then set HF_TOKEN to a token of that account"),
    (lambda e: _hub_failure(e.RepositoryNotFoundError, 404), "{subject} was not found on the Hub (or is private: "
                                                             "set HF_TOKEN)"),
    (lambda e: _hub_failure(e.DisabledRepoError, 403), "{subject} has been disabled on the Hub"),
    (lambda e: _hub_failure(e.RevisionNotFoundError, 404), "{subject} has no revision 'v2'"),
    (lambda e: e.LocalEntryNotFoundError("Cannot find the requested files in the disk cache"),
     "{missing} is not in the local Hub cache and could not be downloaded (Hub access is off, HF_HUB_OFFLINE=1, or "
     "there is no network); download it, or give a local path"),
    (lambda e: e.IncompleteSnapshotError("The cached snapshot for 'me/arithmetic' is incomplete", snapshot_path="/x"),
     "{subject} is only partly in the local Hub cache (an interrupted download) and the Hub is out of reach; "
     "download it again with network access, or give a local path"),
    (lambda e: e.OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled."),
     "{subject} cannot be looked up: Hub access is off (HF_HUB_OFFLINE=1); unset it, or give a local path"),
    (lambda e: _hub_failure(e.HfHubHTTPError, 401),
     "{subject} could not be fetched: the Hub refused the token (HF_TOKEN or the saved login); renew it, or unset "
     "it to read public repositories"),
    (lambda e: ConnectionError("Max retries exceeded with url: /me/arithmetic\nsecond line"),
     "{subject} could not be fetched (ConnectionError: Max retries exceeded with url: /me/arithmetic); check the "
     "network connection, or download it and give a local path"),
    (lambda e: ValueError(f"Bad header Authorization: Bearer {TOKEN}"),  # should a message ever quote the token
     "{subject} could not be fetched (ValueError: Bad header Authorization: Bearer hf_***); check the network "
     "connection, or download it and give a local path"),
]


@pytest.fixture
def hub_fails(monkeypatch):
    """Make every Hub download raise the failure given to the returned function; the token is set."""
    from huggingface_hub import errors

    monkeypatch.setenv("HF_TOKEN", TOKEN)

    def set_failure(failure):
        def fails(*args, **kwargs):
            raise failure(errors)

        monkeypatch.setattr(huggingface_hub, "hf_hub_download", fails)
    return set_failure


@pytest.mark.parametrize(("failure", "sentence"), FAILURES)
def test_a_dataset_file_that_cannot_be_fetched_gets_one_sentence(failure, sentence, hub_fails):
    hub_fails(failure)
    with pytest.raises(StudioError) as caught:
        read_text("hf://datasets/me/arithmetic@v2/train.jsonl")
    subject = "dataset 'me/arithmetic'"
    expected = sentence.format(subject=subject, missing=f"file 'train.jsonl' of {subject}")
    assert str(caught.value) == f"hf://datasets/me/arithmetic@v2/train.jsonl: {expected}"
    assert TOKEN not in str(caught.value)


@pytest.mark.parametrize(("failure", "sentence"), FAILURES)
def test_a_model_that_cannot_be_fetched_gets_the_same_sentence(failure, sentence, hub_fails):
    hub_fails(failure)  # the model's config.json is the first file read
    with pytest.raises(StudioError) as caught:
        open_model("me/arithmetic@v2", fetch_weights=False)
    model = "Model 'me/arithmetic@v2'"
    assert str(caught.value) == sentence.format(subject=model, missing=model) + "."
    assert TOKEN not in str(caught.value)


def test_a_missing_file_is_named_with_where_to_find_its_name(hub_fails):
    hub_fails(lambda e: _hub_failure(e.RemoteEntryNotFoundError, 404))
    with pytest.raises(StudioError) as caught:
        read_text("hf://datasets/me/arithmetic/train.jsonl")
    assert str(caught.value) == ("hf://datasets/me/arithmetic/train.jsonl: dataset 'me/arithmetic' has no file "
                                 "'train.jsonl': give its path as the dataset's Files tab lists it")
    with pytest.raises(StudioError) as caught:  # a model repository without config.json
        open_model("me/arithmetic", fetch_weights=False)
    assert str(caught.value) == ("Model 'me/arithmetic' lacks a file the studio reads (404 Client Error.): a "
                                 "transformers model holds config.json and its weights.")
