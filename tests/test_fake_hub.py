"""The local fake Hub (tests/support/fake_hub.py) against the real clients: huggingface_hub's upload and download
functions, and transformers' push_to_hub / from_pretrained. Each client runs in a subprocess, since HF_ENDPOINT is
read at import."""

import json
import sys
import textwrap

import torch
from safetensors.torch import save_file

from tests.support.fake_hub import hub_env
from tests.support.processes import run_command


def run_client(hub, home, script, *args, token="hf_fake_token"):
    """Runs `script` in a fresh Python talking to `hub` with its cache in `home`, and returns what it printed last."""
    result = run_command(
        [sys.executable, "-c", textwrap.dedent(script), *args], env=hub_env(hub.endpoint, home, token), timeout=120
    )
    return json.loads(result.stdout.splitlines()[-1])


UPLOAD = """
    import json, sys
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    url = api.create_repo("user/round-trip", private=True)
    try:
        api.create_repo("user/round-trip")
        conflict = None
    except HfHubHTTPError as error:
        conflict = error.response.status_code
    again = api.create_repo("user/round-trip", exist_ok=True)
    first = api.upload_folder(repo_id="user/round-trip", folder_path=sys.argv[1])
    unchanged = api.upload_folder(repo_id="user/round-trip", folder_path=sys.argv[1])
    second = api.upload_file(repo_id="user/round-trip", path_or_fileobj=b"second version", path_in_repo="notes.txt")
    info = api.model_info("user/round-trip")
    print(json.dumps({"url": url, "again": again, "conflict": conflict, "first": first.oid, "unchanged": unchanged.oid,
                      "second": second.oid, "sha": info.sha, "private": info.private,
                      "siblings": sorted(s.rfilename for s in info.siblings)}))
"""

DOWNLOAD = """
    import json, sys
    from pathlib import Path
    from huggingface_hub import hf_hub_download, snapshot_download

    def error(call):
        try:
            call()
        except Exception as e:
            return [c.__name__ for c in type(e).__mro__]
        return ["no error"]

    errors = {
        "private without token": error(lambda: snapshot_download("user/round-trip", token=False)),
        "missing file": error(lambda: hf_hub_download("user/round-trip", "adapter_config.json")),
        "missing repo": error(lambda: hf_hub_download("user/nothing-here", "config.json")),
        "missing revision": error(lambda: hf_hub_download("user/round-trip", "notes.txt", revision="v9")),
    }
    snapshot = snapshot_download("user/round-trip")
    listed = sorted(p.relative_to(snapshot).as_posix() for p in Path(snapshot).rglob("*") if p.is_file())
    single = hf_hub_download("user/round-trip", "weights/model.safetensors")
    old_notes = hf_hub_download("user/round-trip", "notes.txt", revision=sys.argv[1])
    print(json.dumps(dict(errors=errors, snapshot=snapshot, listed=listed, single=single, old_notes=old_notes)))
"""


def test_upload_then_download_give_the_same_bytes(hub, tmp_path):
    folder = tmp_path / "folder"
    (folder / "weights").mkdir(parents=True)
    (folder / "notes.txt").write_text("first version\n")
    save_file({"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)}, folder / "weights" / "model.safetensors")
    sent = {path: (folder / path).read_bytes() for path in ["notes.txt", "weights/model.safetensors"]}

    up = run_client(hub, tmp_path / "home-up", UPLOAD, folder)
    assert up["url"] == up["again"] == f"{hub.endpoint}/user/round-trip"
    assert up["conflict"] == 409
    assert up["unchanged"] == up["first"] != up["second"] == up["sha"]  # an upload that changes nothing makes no commit
    assert up["private"] is True and up["siblings"] == sorted(sent)
    assert hub.files("user/round-trip", revision=up["first"]) == sent
    assert hub.files("user/round-trip")["notes.txt"] == b"second version"
    assert hub.tokens == {"hf_fake_token"}

    down = run_client(hub, tmp_path / "home-down", DOWNLOAD, up["first"])
    assert "RepositoryNotFoundError" in down["errors"]["private without token"]
    assert "EntryNotFoundError" in down["errors"]["missing file"]
    assert "RepositoryNotFoundError" in down["errors"]["missing repo"]
    assert "RevisionNotFoundError" in down["errors"]["missing revision"]
    snapshot = tmp_path / "home-down" / "hub" / "models--user--round-trip" / "snapshots" / up["sha"]
    assert down["snapshot"] == str(snapshot)
    assert down["listed"] == sorted(sent)
    assert (snapshot / "notes.txt").read_bytes() == b"second version"
    assert (snapshot / "weights" / "model.safetensors").read_bytes() == sent["weights/model.safetensors"]
    assert open(down["single"], "rb").read() == sent["weights/model.safetensors"]
    assert open(down["old_notes"], "rb").read() == sent["notes.txt"]


OUTPUTS = """
    import json, sys, torch

    def save_outputs(model, path):
        with torch.no_grad():
            out = model(torch.arange(14).reshape(2, 7) % 99)
        torch.save([out.last_hidden_state, out.pooler_output], path)
        print(json.dumps(type(model).__name__))
"""

PUSH = (
    OUTPUTS
    + """
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, vocab_size=99)
    model = BertModel(config).eval()
    model.push_to_hub("user/tiny-bert")
    save_outputs(model, sys.argv[1])
"""
)

LOAD = (
    OUTPUTS
    + """
    from transformers import AutoModel

    save_outputs(AutoModel.from_pretrained("user/tiny-bert"), sys.argv[1])
"""
)


def test_transformers_push_to_hub_then_from_pretrained(hub, tmp_path):
    assert run_client(hub, tmp_path / "home-push", PUSH, tmp_path / "pushed.pt") == "BertModel"
    files = hub.files("user/tiny-bert")
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    assert json.loads(files["config.json"])["hidden_size"] == 32

    assert run_client(hub, tmp_path / "home-load", LOAD, tmp_path / "loaded.pt") == "BertModel"
    pushed, loaded = torch.load(tmp_path / "pushed.pt"), torch.load(tmp_path / "loaded.pt")
    assert [t.shape for t in loaded] == [(2, 7, 32), (2, 32)]
    for a, b in zip(pushed, loaded, strict=True):
        assert torch.equal(a, b)
