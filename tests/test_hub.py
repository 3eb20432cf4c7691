"""``masksub export --push-to-hub``: the exported folder goes to a Hub model repository that timm loads as
``hf-hub:<repo>``. No network here: the Hub's two calls (create the repository, upload the folder) are recorded by a
stand-in that keeps the uploaded files, and timm's Hub download reads them back."""

from __future__ import annotations

import ast
import shutil
import types
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import pytest
import safetensors.torch
import timm
import timm.models._hub
import torch
from PIL import Image
from test_export import _export, _train

from masksub.cli import main
from masksub.data import load_fashion_mnist
from masksub.train.build import build_model
from masksub.train.evaluate import evaluate_checkpoint, load_run, trained_model
from masksub.train.predict import predict

REPO = "someone/fashion-mnist-vit"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("hub"), "mask")


class FakeHub:
    """HfApi's create_repo and upload_folder: what they were asked, and the files uploaded (path -> bytes)."""

    def __init__(self, fail: Exception | None = None):
        self.calls, self.files, self.fail = [], {}, fail

    def install(self, monkeypatch) -> None:
        """In place of HfApi's two calls, with a token that a login would give."""
        monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_token")
        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda api, *a, **kw: self.create_repo(api, *a, **kw))
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda api, **kw: self.upload_folder(api, **kw))

    def create_repo(self, api, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, api, *, repo_id, folder_path, **kw):
        self.calls.append(("upload_folder", repo_id, kw))
        if self.fail:
            raise self.fail
        root = Path(folder_path)
        self.files = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
        return types.SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0123abc")


@pytest.fixture
def hub(monkeypatch):
    fake = FakeHub()
    fake.install(monkeypatch)
    return fake


def test_the_export_is_uploaded_as_written_and_timm_loads_it_from_the_hub(run, tmp_path, hub, capsys, monkeypatch):
    folder, _ = run
    out = tmp_path / "out"
    assert _export(folder, out, "--push-to-hub", REPO, "--private") == 0
    printed = capsys.readouterr().out
    assert f"pushed {out} to https://huggingface.co/{REPO}/commit/0123abc" in printed
    assert f"timm.create_model('hf-hub:{REPO}', pretrained=True)" in printed
    (create, repo, kw), (upload, *_) = hub.calls
    assert (create, repo, upload) == ("create_repo", REPO, "upload_folder")
    assert kw["private"] is True and kw["exist_ok"] is True and kw["repo_type"] == "model"
    written = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert hub.files == written and set(written) == {"model.safetensors", "config.json", "README.md"}
    card = written["README.md"].decode()
    assert f'timm.create_model("hf-hub:{REPO}", pretrained=True)' in card and 'or "local-dir:out"' in card

    def download(repo_id, filename, **kw):  # timm's Hub download, served from what was uploaded
        assert repo_id == REPO
        path = tmp_path / "hub" / filename
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(hub.files[filename])
        return str(path)

    monkeypatch.setattr(timm.models._hub, "hf_hub_download", download)
    x, _ = load_fashion_mnist("test")
    Image.fromarray(x[0].numpy()).save(tmp_path / "image.png")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    exec(compile(card.split("```python\n")[1].split("```")[0], "README.md", "exec"), {})  # the card's code
    assert len(ast.literal_eval(capsys.readouterr().out.strip())) == 5
    loaded = timm.create_model(f"hf-hub:{REPO}", pretrained=True).eval()
    cfg, state = load_run(folder / "last.pt", {}, "test")
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), trained_model(cfg, state, 10).eval()(x))
    assert len(loaded.pretrained_cfg["label_names"]) == 10


def test_without_private_the_hub_chooses_the_visibility(run, tmp_path, hub):
    assert _export(run[0], tmp_path / "out", "--push-to-hub", REPO) == 0
    assert hub.calls[0][2]["private"] is None


@pytest.mark.parametrize(
    "case,message",
    [
        ("no token", "needs a Hugging Face token with write access: run `hf auth login`, or set HF_TOKEN"),
        ("bad name", "is not a Hub repository name"),
        ("offline", "HF_HUB_OFFLINE is set"),
        ("private alone", "--private is for the repository --push-to-hub creates"),
    ],
)
def test_a_push_that_cannot_work_is_refused_before_anything_is_written(
    run, tmp_path, hub, capsys, monkeypatch, case, message
):
    repo = {"bad name": "someone/not a name!"}.get(case, REPO)
    if case == "no token":
        monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    if case == "offline":
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    push = ["--private"] if case == "private alone" else ["--push-to-hub", repo]
    assert _export(run[0], tmp_path / "out", *push) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == [] and hub.calls == []


def test_a_failed_upload_keeps_the_written_folder_and_says_how_to_push_it_later(run, tmp_path, capsys, monkeypatch):
    fake = FakeHub(fail=ConnectionError("no route to host"))
    fake.install(monkeypatch)
    out = tmp_path / "out"
    assert _export(run[0], out, "--push-to-hub", REPO) == 2
    err = capsys.readouterr().err
    assert f"{out} is written and checked, but pushing it to the Hub repository {REPO} failed: no route to host" in err
    assert f"Push it later with: hf upload {REPO} {out} ." in err
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "README.md"}


@pytest.fixture
def on_the_hub(run, tmp_path, monkeypatch):
    """An export of the run as the Hub serves it: snapshot_download copies it into a cache folder of its own."""
    export = tmp_path / "export"
    assert _export(run[0], export) == 0
    asked = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
        asked.append((repo_id, revision, allow_patterns))
        if repo_id != REPO:
            raise OSError(f"404: {repo_id} not found")
        cache = tmp_path / "cache" / str(len(asked))
        shutil.copytree(export, cache)
        return str(cache)

    def hf_hub_download(repo_id, filename, **kw):  # timm's download of one file
        assert repo_id == REPO
        return str(export / filename)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", hf_hub_download)
    return export, asked


def test_eval_and_predict_read_an_export_on_the_hub_as_they_read_the_folder(on_the_hub, tmp_path, capsys):
    export, asked = on_the_hub
    local = evaluate_checkpoint(export)
    assert evaluate_checkpoint(Path(f"hf-hub:{REPO}@v1")) == local
    assert asked == [(REPO, "v1", ["config.json", "model.safetensors", "README.md"])]
    x, _ = load_fashion_mnist("test")
    for i in range(3):
        Image.fromarray(x[i].numpy()).save(tmp_path / f"{i}.png")
    images = [str(tmp_path / f"{i}.png") for i in range(3)]
    assert predict(Path(f"hf-hub:{REPO}"), images) == predict(export, images)
    assert main(["eval", "--checkpoint", f"hf-hub:{REPO}"]) == 0
    assert f"top-1 {local['weights']['top1']:.2f}%" in capsys.readouterr().out


def test_a_repository_that_cannot_be_read_is_named(on_the_hub, capsys):
    assert main(["eval", "--checkpoint", "hf-hub:someone/missing"]) == 2
    err = capsys.readouterr().err
    assert "cannot download hf-hub:someone/missing from the Hugging Face Hub: 404: someone/missing not found" in err
    assert "A private repository needs `hf auth login` or HF_TOKEN" in err


def test_a_run_finetunes_from_an_export_on_the_hub(on_the_hub, tmp_path):
    """``--model.name hf-hub:<repo>``, as the card says: the run trains, starting from the export's weights."""
    export, _ = on_the_hub
    more = {"model.name": f"hf-hub:{REPO}", "model.kwargs": {"pretrained": True}, "sub.kind": "none"}
    again, _ = _train(tmp_path, "from-hub", **more)
    cfg, _ = load_run(again / "last.pt", {}, "test")
    cfg.model.kwargs = {**cfg.model.kwargs, "pretrained": True}  # as the run started (its checkpoint drops it)
    start = build_model(cfg, 10).state_dict()
    exported = safetensors.torch.load_file(export / "model.safetensors")
    assert start.keys() == exported.keys()
    for name, tensor in start.items():
        assert torch.equal(tensor, exported[name]), name
