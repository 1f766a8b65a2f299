"""Model cards, ``save_pretrained`` with our card, ``push_to_hub`` (recorded, no network) and pulling the pushed
repo back from a real huggingface_hub cache in offline mode."""

import hashlib
import json
import os

import huggingface_hub
import pytest
import torch
from hubcache import git_blob_sha1, populate_hub_cache
from huggingface_hub import CommitInfo, HfApi, ModelCard
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file

from peft_ortho import OrthoLoraConfig, model_card, push_to_hub, testing
from peft_ortho.hub import save_pretrained

REPO = "alice/rex-ortho"
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md"}
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"


class RecordingApi(HfApi):
    """An ``HfApi`` that records what it is asked to do and keeps a copy of every uploaded file, offline."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls: list[tuple[str, dict]] = []
        self.uploaded: dict[str, bytes] = {}
        RecordingApi.last = self  # lets a test that passes the class inspect the instance push_to_hub made

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        root = kwargs["folder_path"]
        for dirpath, _, filenames in os.walk(root):
            for fn in filenames:
                path = os.path.join(dirpath, fn)
                with open(path, "rb") as f:
                    self.uploaded[os.path.relpath(path, root).replace(os.sep, "/")] = f.read()
        oid = hashlib.sha1(b"".join(self.uploaded[k] for k in sorted(self.uploaded))).hexdigest()
        return CommitInfo(
            commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/{oid}",
            commit_message=kwargs["commit_message"],
            commit_description="",
            oid=oid,
        )


@pytest.fixture(scope="module")
def ortho_unet():
    """An orthogonal adapter on the tiny UNet with random lora_B (a non-zero delta) and lora_alpha != r."""
    model = get_peft_model(
        testing.tiny_unet(),
        OrthoLoraConfig(r=4, lora_alpha=8, target_modules=testing.UNET_TARGETS, slot=2, init_lora_weights=False),
    )
    with torch.no_grad():
        base = testing.tiny_unet()(**testing.unet_inputs(model)).sample
        ref = model(**testing.unet_inputs(model)).sample
    assert (ref - base).abs().max() > 1e-3
    return model, ref


def _state_dict_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ the card


def test_model_card_metadata_and_body(ortho_unet):
    config = ortho_unet[0].peft_config["default"]
    card = model_card(config, base_model="org/tiny-sd", diffusers_weight_name=DIFFUSERS_FILE, repo_id=REPO)
    loaded = ModelCard(str(card))  # what the Hub parses back from README.md
    assert loaded.data.library_name == "peft"
    assert loaded.data.base_model == "org/tiny-sd"
    assert loaded.data.tags == [
        "peft-ortho",
        "orthogonal-adaptation",
        "lora",
        "diffusers",
        "text-to-image",
        "diffusers-training",
        "template:sd-lora",
        "base_model:adapter:org/tiny-sd",  # the Hub's adapter relation, as peft writes it
    ]
    assert loaded.data.pipeline_tag == "text-to-image"
    text = loaded.text
    assert "import peft_ortho" in text and f"PeftModel.from_pretrained(base_model, '{REPO}')" in text
    assert text.index("import peft_ortho") < text.index("PeftModel.from_pretrained")
    assert f"pipe.load_lora_weights('{REPO}', weight_name='{DIFFUSERS_FILE}')" in text
    # Provenance: everything a collaborator compares before merging.
    assert "| `basis_seed` | `0` |" in text and f'| `basis_algorithm` | `"{config.basis_algorithm}"` |' in text
    assert "| `slot` | `2` |" in text
    for shape, checksum in config.basis_checksums.items():
        rows = config.basis_rows[shape]
        assert f"| `{shape}` | {rows[0]}–{rows[-1]} | `{checksum}` |" in text

    # Base model from the config when not given; no diffusers tag without a diffusers file.
    plain = model_card({**config.to_dict(), "base_model_name_or_path": "org/from-config"})
    assert plain.data.base_model == "org/from-config" and "diffusers" not in plain.data.tags


def test_model_card_for_a_merged_adapter_lists_its_sources():
    sources = [
        {"name": "alice/rex-ortho", "revision": "v1.2", "commit": "a" * 40, "weight": 0.6, "peft_type": "ORTHO_LORA"},
        {"name": "./my|style", "revision": None, "commit": None, "weight": 1.0, "peft_type": "ORTHO_LORA"},
    ]
    card = model_card(
        None, base_model="org/tiny-sd", sources=sources, summary="Merged rex and style.", extra_tags=["x"]
    )
    assert card.data.library_name == "peft" and card.data.base_model == "org/tiny-sd"
    assert card.data.tags == ["peft-ortho", "orthogonal-adaptation", "lora", "base_model:adapter:org/tiny-sd", "x"]
    assert "Merged rex and style." in card.text
    assert "| name | revision | commit | weight | peft_type |" in card.text
    assert f"| alice/rex-ortho | v1.2 | {'a' * 40} | 0.6 | ORTHO_LORA |" in card.text
    assert "| ./my\\|style |  |  | 1.0 | ORTHO_LORA |" in card.text  # "|" escaped, None as empty
    assert "import peft_ortho" not in card.text  # a merged plain LoRA needs only peft


def test_save_pretrained_replaces_peft_generic_card(ortho_unet, tmp_path):
    model, _ = ortho_unet
    model.save_pretrained(str(tmp_path / "peft"))
    peft_card = ModelCard.load(str(tmp_path / "peft" / "README.md"))
    assert "peft-ortho" not in (peft_card.data.tags or [])  # what peft alone writes: generic template, no method

    out = save_pretrained(model, tmp_path / "ours", base_model="org/tiny-sd", include_diffusers=True)
    assert set(os.listdir(out)) == ADAPTER_FILES | {DIFFUSERS_FILE}
    card = ModelCard.load(os.path.join(out, "README.md"))
    assert card.data.library_name == "peft" and card.data.base_model == "org/tiny-sd"
    assert "orthogonal-adaptation" in card.data.tags and "More Information Needed" not in card.text
    reloaded = PeftModel.from_pretrained(testing.tiny_unet(), out)
    assert _state_dict_equal(get_peft_model_state_dict(reloaded), get_peft_model_state_dict(model))
    with pytest.raises(FileExistsError):
        save_pretrained(model, out)
    with pytest.raises(ValueError, match="safetensors only"):
        save_pretrained(model, tmp_path / "pickled", safe_serialization=False)
    assert not (tmp_path / "pickled").exists()


# ------------------------------------------------------------------------------------------------ push + pull


@pytest.fixture
def offline(monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE into a constant at import: patch both, so no request can leave.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_push_to_hub_uploads_adapter_card_and_diffusers_file(ortho_unet, tmp_path, offline):
    model, ref = ortho_unet
    api = RecordingApi(token="hf_fake")
    info = push_to_hub(model, REPO, private=True, revision="v1.2", commit_message="rex v1.2", api=api)

    assert [name for name, _ in api.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert api.calls[0][1] == {"repo_id": REPO, "exist_ok": True, "private": True, "repo_type": "model"}
    assert api.calls[1][1] == {"repo_id": REPO, "branch": "v1.2", "exist_ok": True, "repo_type": "model"}
    upload = api.calls[2][1]
    assert upload["repo_id"] == REPO and upload["revision"] == "v1.2" and upload["commit_message"] == "rex v1.2"
    assert not os.path.exists(upload["folder_path"])  # the staging folder is cleaned up
    assert info.oid and info.commit_message == "rex v1.2"

    assert set(api.uploaded) == ADAPTER_FILES | {DIFFUSERS_FILE}
    assert json.loads(api.uploaded["adapter_config.json"])["peft_type"] == "ORTHO_LORA"
    card = ModelCard(api.uploaded["README.md"].decode())
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "text-to-image"
    assert card.data.tags[:4] == ["peft-ortho", "orthogonal-adaptation", "lora", "diffusers"]
    assert "diffusers-training" in card.data.tags and "template:sd-lora" in card.data.tags
    assert f"PeftModel.from_pretrained(base_model, '{REPO}')" in card.text and "basis_seed" in card.text

    # Pull it back: a real cache layout, revision "v1.2", HF_HUB_OFFLINE=1.
    cache = str(tmp_path / "cache")
    commit = populate_hub_cache(cache, REPO, api.uploaded, revision="v1.2")
    pulled = PeftModel.from_pretrained(testing.tiny_unet(), REPO, revision="v1.2", cache_dir=cache)
    assert _state_dict_equal(get_peft_model_state_dict(pulled), get_peft_model_state_dict(model))
    inputs = testing.unet_inputs(pulled)
    with torch.no_grad():
        assert torch.equal(pulled(**inputs).sample, ref)
    # The diffusers file from the same cache, by commit hash, into a plain pipeline.
    pipe = testing.tiny_sd_pipeline()
    pipe.load_lora_weights(REPO, weight_name=DIFFUSERS_FILE, revision=commit, cache_dir=cache)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(**inputs).sample, ref, atol=1e-6, rtol=0)
    assert torch.equal(
        load_file(huggingface_hub.hf_hub_download(REPO, DIFFUSERS_FILE, revision="v1.2", cache_dir=cache))[
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"
        ],
        get_peft_model_state_dict(model)[
            "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"
        ],
    )


def test_push_to_hub_skips_the_diffusers_file_for_non_diffusers_models(tiny_gpt2):
    model = get_peft_model(tiny_gpt2, LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"]))
    # An HfApi class is instantiated with the token.
    info = push_to_hub(model, "bob/gpt2-lora", token="hf_fake", api=RecordingApi)
    api = RecordingApi.last
    assert isinstance(info, CommitInfo) and api.token == "hf_fake"
    assert [name for name, _ in api.calls] == ["create_repo", "upload_folder"]
    assert set(api.uploaded) == ADAPTER_FILES  # an LLM adapter gets no diffusers file
    card = ModelCard(api.uploaded["README.md"].decode())
    assert card.data.library_name == "peft" and card.data.tags == ["peft-ortho", "lora"]
    assert "import peft_ortho" not in card.text  # a plain LoRA needs only peft


def test_push_to_hub_from_saved_folders(ortho_unet, tiny_gpt2, tmp_path):
    ortho_unet[0].save_pretrained(str(tmp_path / "rex"))
    api = RecordingApi()
    push_to_hub(str(tmp_path / "rex"), REPO, api=api)
    assert set(api.uploaded) == ADAPTER_FILES | {DIFFUSERS_FILE}
    assert api.uploaded["adapter_model.safetensors"] == (tmp_path / "rex" / "adapter_model.safetensors").read_bytes()
    assert "orthogonal-adaptation" in ModelCard(api.uploaded["README.md"].decode()).data.tags

    get_peft_model(tiny_gpt2, LoraConfig(r=2, target_modules=["c_attn"])).save_pretrained(str(tmp_path / "llm"))
    api = RecordingApi()
    push_to_hub(str(tmp_path / "llm"), "bob/gpt2-lora", api=api)
    assert set(api.uploaded) == ADAPTER_FILES  # no UNet/transformer blocks: not a diffusers LoRA


# ------------------------------------------------------------------------------------------------ the cache helper


def test_populate_hub_cache_is_what_huggingface_hub_reads(tmp_path, offline):
    from huggingface_hub import get_cached_repo_tree, hf_hub_download, scan_cache_dir, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    files = {"config.json": b"hello\n", "sub/w.safetensors": b"\x00" * 64, "README.md": "# card\n"}
    cache = str(tmp_path / "cache")
    commit = populate_hub_cache(cache, "org/repo", files, revision="v1.2", commit_hash="c" * 40)
    assert commit == "c" * 40
    storage = os.path.join(cache, "models--org--repo")
    assert open(os.path.join(storage, "refs", "v1.2")).read() == commit
    # Blob names are the Hub's etags: git blob sha1 for regular files (`git hash-object` of "hello\n"), sha256 for LFS.
    assert os.path.isfile(os.path.join(storage, "blobs", "ce013625030ba8dba906f756967f9e9ca394464a"))
    assert os.path.isfile(os.path.join(storage, "blobs", hashlib.sha256(b"\x00" * 64).hexdigest()))
    assert git_blob_sha1(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"

    for revision in ("v1.2", commit):
        folder = snapshot_download("org/repo", revision=revision, cache_dir=cache, local_files_only=True)
        assert folder == os.path.join(storage, "snapshots", commit)
        for path, data in files.items():
            local = hf_hub_download("org/repo", path, revision=revision, cache_dir=cache, local_files_only=True)
            expected = data.encode() if isinstance(data, str) else data
            assert open(local, "rb").read() == expected == open(os.path.join(folder, path), "rb").read()
    assert sorted(f.path for f in get_cached_repo_tree("org/repo", revision="v1.2", cache_dir=cache)) == sorted(files)

    # A second revision shares blobs; scan_cache_dir sees a clean cache with both refs.
    main = populate_hub_cache(cache, "org/repo", {"config.json": b"hello\n", "README.md": b"# v2\n"})
    report = scan_cache_dir(cache)
    assert report.warnings == []
    (repo,) = report.repos
    assert repo.repo_id == "org/repo" and {r.commit_hash: r.refs for r in repo.revisions} == {
        commit: frozenset({"v1.2"}),
        main: frozenset({"main"}),
    }
    assert len(os.listdir(os.path.join(storage, "blobs"))) == 4  # hello, zeros, card, card v2
    with pytest.raises(LocalEntryNotFoundError):  # offline: what is not cached is not fetched
        hf_hub_download("org/repo", "config.json", revision="v9", cache_dir=cache)
