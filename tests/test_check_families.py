"""scripts/check_families.py: the per-family check runs end to end on two families and reports each result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import needs_transformers_5

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_families.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)


def test_two_families_pass_every_check(tmp_path):
    proc = _run("--families", "vision_transformer", "resnet", "--out", str(tmp_path / "fam"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["family"]: r for r in json.loads((tmp_path / "fam.json").read_text())["rows"]}
    assert rows["vision_transformer"]["mask"] == "ok (vit)", rows["vision_transformer"]
    assert rows["resnet"]["mask"] == "ok (pixels)", rows["resnet"]
    for row in rows.values():
        assert row["dropout"] == row["droppath"] == "ok", row
    vit = rows["vision_transformer"]
    size = "x".join(map(str, vit["input"][1:]))
    assert f"| vision_transformer | {vit['model']} | {size} | ok (vit) | ok | ok |" in (tmp_path / "fam.md").read_text()


def test_unknown_family_is_refused_with_the_installed_ones():
    proc = _run("--families", "no_such_family")
    assert proc.returncode == 2
    assert "unknown families ['no_such_family']" in proc.stderr and "vision_transformer" in proc.stderr


@needs_transformers_5
def test_text_architectures_pass_mask_and_dropout_and_drop_tokens(tmp_path):
    proc = _run("--text", "--families", "bert", "llama", "--out", str(tmp_path / "text"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["family"]: r for r in json.loads((tmp_path / "text.json").read_text())["rows"]}
    for row in rows.values():
        assert row["mask"] == "ok (text)" and row["dropout"] == "ok", row
        assert "no residual drop-path sites" in row["droppath"], row  # BERT and Llama have none
        assert row["drop"].startswith("ok: equal to hiding"), row  # mode="drop" on the kept tokens
    table = (tmp_path / "text.md").read_text()
    assert "transformers" in table.splitlines()[0] and "| droppath | drop |" in table


@needs_transformers_5
def test_vision_language_models_are_scored_as_their_own_loss_scores_them(tmp_path):
    """LLaVA's and Qwen2.5-VL's labels (its 3-D RoPE's sections fitted to the shrunk heads) are read as a causal
    model's, Florence-2's (an encoder-decoder whose decoder ids sit in its text configuration; before they were read
    there, its decoder inputs were made with other ids) as an encoder-decoder's: equal to each one's own loss. The drop
    mode takes LLaVA's and Qwen2.5-VL's, equal to hiding the tokens, and refuses Florence-2."""
    proc = _run("--vlm", "--families", "llava", "qwen2_5_vl", "florence2", "--out", str(tmp_path / "vlm"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["family"]: r for r in json.loads((tmp_path / "vlm.json").read_text())["rows"]}
    for family in ("llava", "qwen2_5_vl"):
        assert rows[family]["labels"] == "ok: the model's own loss (labels shifted)", rows[family]
    assert rows["florence2"]["labels"] == "ok: the model's own loss (decoder inputs from the labels)", rows["florence2"]
    for family, row in rows.items():
        drop = "refused" if family == "florence2" else "ok: equal to hiding"
        assert row["mask"] == "ok (text)" and row["drop"].startswith(drop), row


@needs_transformers_5  # rope_parameters
def test_a_3d_ropes_sections_are_fitted_to_the_shrunk_heads_rotary_half():
    """Qwen2.5-VL's and GLM-4V-MoE's modeling code splits the rotary half of each head into time, height and width
    sections whose default is sized for the released heads: the check fits them to the shrunk heads (GLM-4V-MoE
    rotates half of each), in their 2:3:3 proportion; a model without sections gets none."""
    sys.path.insert(0, str(SCRIPT.parent))
    import check_families

    for family, rotary in (("qwen2_5_vl", 16), ("glm4v_moe", 8), ("llava", None)):
        config = check_families.shrunk_config(family, parts=True).get_text_config()
        check_families._fit_rope_sections(config)
        assert config.rope_parameters.get("mrope_section") == (rotary and check_families._split([2, 3, 3], rotary // 2))
        if rotary:
            assert config.hidden_size // config.num_attention_heads == 16
    assert check_families._split([16, 24, 24], 8) == [2, 3, 3] and check_families._split([8, 12, 12], 4) == [1, 1, 2]


@needs_transformers_5  # the drop mode is refused before
def test_the_drop_check_sees_an_error_small_beside_the_logits_at_init(monkeypatch):
    """DeBERTa v2 is built with its checkpoints' relative attention, and the check fails the drop mode without the
    kept tokens' relative positions: off by about 1e-6 where the logits at init are about 1e-2, which a fixed
    tolerance would pass."""
    import torch

    from masksub.adapters.text import TokenMaskAdapter

    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import check_families

    torch.manual_seed(0)
    model, x, _, options = check_families.build_text("deberta-v2")
    assert model.config.relative_attention and not model.config.position_biased_input
    assert check_families.check_text_drop(model, x, options).startswith("ok: equal to hiding")
    monkeypatch.setattr(TokenMaskAdapter, "_deberta_positions", lambda self, *args: None)
    assert check_families.check_text_drop(model, x, options).startswith("DIFFERS from hiding")


@needs_transformers_5
def test_window_gives_a_sliding_window_shorter_than_the_input_which_the_drop_check_sees(tmp_path, monkeypatch):
    """``--window 4``: Mistral's sliding window (4096 tokens by default, longer than the 16-token input, where
    dropping tokens changes nothing a window sees) is 4 tokens, said in the table; Llama has none. The drop mode
    keeps Mistral's window by position, and the check fails it without the window masks."""
    import torch

    proc = _run("--lm", "--window", "4", "--families", "mistral", "llama", "--out", str(tmp_path / "lm"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["family"]: r for r in json.loads((tmp_path / "lm.json").read_text())["rows"]}
    assert (rows["mistral"]["window"], rows["llama"]["window"]) == (4, None)
    assert all(row["drop"].startswith("ok: equal to hiding") for row in rows.values()), rows
    assert "| mistral | MistralForCausalLM | 16 tokens, a window of 4 |" in (tmp_path / "lm.md").read_text()

    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import check_families

    from masksub.adapters import text

    monkeypatch.setattr(check_families, "WINDOW", 4)
    torch.manual_seed(0)
    model, x, _, options = check_families.build_lm("mistral")
    x = {k: v for k, v in x.items() if k != "labels"}
    assert check_families.check_text_drop(model, x, options).startswith("ok: equal to hiding")
    monkeypatch.setattr(text, "sliding_layers", lambda *args: [])  # no window masks in the sub pass
    assert check_families.check_text_drop(model, x, options).startswith("DIFFERS from hiding")


def test_vision_architectures_drop_tokens_or_get_a_mask_token(tmp_path):
    proc = _run("--vision", "--families", "dinov2", "swin", "--out", str(tmp_path / "vision"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["family"]: r for r in json.loads((tmp_path / "vision.json").read_text())["rows"]}
    assert rows["dinov2"]["mask"] == "ok (hf_vit)", rows["dinov2"]  # token dropping
    assert rows["swin"]["mask"] == "ok (hf_masktoken)", rows["swin"]  # windows need the full grid
    for row in rows.values():
        assert row["dropout"] == row["droppath"] == "ok", row
    assert (
        "| dinov2 | Dinov2ForImageClassification | 224x224 | ok (hf_vit) | ok | ok |"
        in (tmp_path / "vision.md").read_text()
    )


def test_torchvision_families_mask_token_for_swin_and_a_dropout_rate_already_at_the_ratio(tmp_path):
    proc = _run("--torchvision", "--families", "swin_transformer", "squeezenet", "--out", str(tmp_path / "tv"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["family"]: r for r in json.loads((tmp_path / "tv.json").read_text())["rows"]}
    swin, squeeze = rows["swin_transformer"], rows["squeezenet"]
    assert swin["model"] == "swin_t" and swin["mask"] == "ok (masktoken)", swin  # the method's Swin masking
    assert swin["dropout"] == swin["droppath"] == "ok", swin  # droppath: torchvision's StochasticDepth
    assert squeeze["model"] == "squeezenet1_1" and squeeze["mask"] == "ok (pixels)", squeeze
    # its dropout is 0.5, the check's ratio: checked at 0.75 instead of reported as a failure
    assert squeeze["dropout"] == "ok (checked at 0.75: the model's own dropout rates are all 0.5)", squeeze
    assert "no residual drop-path sites" in squeeze["droppath"], squeeze
    assert (tmp_path / "tv.md").read_text().startswith("Checked with torchvision ")


def test_a_model_above_the_largest_side_is_checked_at_the_small_side(monkeypatch):
    """The VLM towers (546-768 px) ran out of memory on a 24 GiB machine and went unchecked: a model above
    MAX_SIDE that takes other sizes is built and checked at SMALL_SIDE, and the table says so."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_families", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(script, "MAX_SIDE", 100)
    monkeypatch.setattr(script, "SMALL_SIDE", 64)
    row = script.check_family("resnet", ["resnet10t"])  # takes any size (no img_size argument)
    assert row["input"] == [3, 64, 64] and row["default_input"] == [3, 176, 176]
    assert row["mask"] == "ok (pixels)" and row["dropout"] == row["droppath"] == "ok", row
    assert "| 64x64 (default 176x176) | ok (pixels) |" in script.markdown([row], "versions", "command")
    monkeypatch.setattr(script, "MAX_SIDE", 512)
    assert script.check_family("resnet", ["resnet10t"])["input"] == [3, 176, 176]


def test_update_replaces_the_checked_rows_and_keeps_the_others(tmp_path):
    import timm
    import torch

    out = tmp_path / "fam"
    keys = ("family", "model", "input", "mask", "dropout", "droppath")
    stale = dict(zip(keys, ("cait", "cait_xxs24_224", [3, 224, 224], "stale", "", "")))
    other = dict(zip(keys, ("zzz", "zzz_tiny", [3, 224, 224], "ok (pixels)", "ok", "ok")))
    versions = f"timm {timm.__version__}, torch {torch.__version__}"
    out.with_suffix(".json").write_text(json.dumps({"versions": versions, "rows": [stale, other]}))
    out.with_suffix(".md").write_text("Checked with ...\n\nCommand: `python scripts/check_families.py --out fam`\n")
    proc = _run("--families", "cait", "--out", str(out), "--update")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["family"] for r in rows] == ["cait", "zzz"] and rows[0]["mask"] == "ok (cait)" and rows[1] == other
    md = out.with_suffix(".md").read_text()
    assert (
        "Command: `python scripts/check_families.py --out fam`; then `python scripts/check_families.py --families" in md
    )
    assert "| zzz | zzz_tiny | 224x224 | ok (pixels) | ok | ok |" in md
    out.with_suffix(".json").write_text(json.dumps({"versions": "timm 0.0.1", "rows": [other]}))
    proc = _run("--families", "cait", "--out", str(out), "--update")
    assert proc.returncode == 2 and "was checked with timm 0.0.1" in proc.stderr


@needs_transformers_5
def test_the_drop_check_compares_a_hybrid_with_its_kept_tokens_run_alone(monkeypatch):
    """Qwen3.5's gated delta nets: the check compares the drop mode's sub pass with each sequence's kept tokens run
    alone (hiding computes something else there), and fails a sub pass that gives them no position ids (their
    attention layers' rotations would count the kept tokens from 0)."""
    import torch

    from masksub.adapters import text

    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import check_families

    torch.manual_seed(0)
    model, x, _, options = check_families.build_lm("qwen3_5")
    x = {k: v for k, v in x.items() if k != "labels"}
    assert check_families.check_text_drop(model, x, options).startswith("ok: equal to the kept tokens alone")
    monkeypatch.setattr(text, "MASK_POSITION_DECODERS", ("qwen3_5_text",))  # positions left to the model
    assert check_families.check_text_drop(model, x, options).startswith("DIFFERS from the kept tokens alone")
