"""The benchmark scripts run in their tiny modes and write their results (timings are never asserted)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import needs_transformers_5

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(script: str, *args: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, env=ENV, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_ddp_comm_counts_one_one_two(tmp_path):
    _run("ddp_comm.py", "--tiny", "--out", str(tmp_path))
    results = json.loads((tmp_path / "ddp_comm.json").read_text())["results"]
    # 2 micro-batches per step: sync_every_backward reduces at each of their 4 backwards
    for kind, expected in (("plain", 1), ("masksub", 1), ("masksub_every", 4), ("research", 2)):
        r = results["ddp"][kind]
        assert r["reduction_rounds_per_step"] == [expected] * 3, kind
        assert r["elements_per_step"] == [expected * r["gradient_elements"]] * 3, kind
    md = (tmp_path / "ddp_comm.md").read_text()
    assert "| DDP (all-reduce rounds) | research-code style | 1 | 2 | 2.00 |" in md
    if not results["fsdp"]:
        return  # torch < 2.6: no fully_shard
    modules, fsdp = results["fsdp_modules"], results["fsdp"]
    plain = fsdp["plain"]["elements_per_step"]
    assert plain[0] >= fsdp["plain"]["gradient_elements"]  # every gradient (padded to the world size)
    for kind, expected in (("plain", 1), ("masksub", 1), ("masksub_every", 4), ("research", 2)):
        assert fsdp[kind]["reduction_rounds_per_step"] == [expected * modules] * 3, kind
        assert fsdp[kind]["elements_per_step"] == [expected * plain[0]] * 3, kind
    # peak memory is measured, not asserted: every FSDP step has a row
    assert all(r["peak_mib"] > 0 for r in fsdp.values())
    memory = md.split("peak tensor memory")[1]
    assert all(f"| {name} | " in memory for name in ("plain", "MaskSub", "MaskSub, sync_every_backward"))


def test_step_cost_tiny(tmp_path):
    _run("step_cost.py", "--scale", "tiny", "--out", str(tmp_path))
    data = json.loads((tmp_path / "step_cost_tiny.json").read_text())
    assert set(data["models"]) == {"vit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "resnet10t"}
    # CPUs of one model name differ in their bf16 instructions, which set bf16 autocast's speed: recorded
    assert "bf16 instructions: " in data["meta"]["hardware"]
    for name, row in data["models"].items():
        for v in ("timm_loop", "plain", "masksub", "research"):
            assert row[f"eager/{v}"]["s_per_step"] > 0
            assert row[f"eager/{v}"]["peak_gib"] > 0  # tensor memory, from the profiler on a CPU
        # Both two-backward steps free the main graph before the sub pass: the same peak.
        assert row["eager/masksub"]["peak_gib"] == pytest.approx(row["eager/research"]["peak_gib"], rel=0.01)
        # Token dropping makes the ViT sub pass cheaper than the main pass; masking elsewhere does not.
        if name.startswith("vit"):
            assert 1.3 < row["flop_ideal_ratio"] < 1.7
        else:
            assert row["flop_ideal_ratio"] == pytest.approx(2.0, rel=0.01)
    md = (tmp_path / "step_cost_tiny.md").read_text()
    assert "masksub / plain" in md and md.count("| eager |") == 3
    first = {name: row["runs"]["eager"] for name, row in data["models"].items()}
    # With --grad-checkpointing a second run times every variant with and without checkpointing in the same
    # rounds: its rows replace the eager ones, each mode records the run it came from, and checkpointing
    # holds fewer activations at the peak. A batch of 64 makes activations, not the optimizer's parameter
    # state, set the tiny ViT's peak (at a batch of 4 the two peaks can coincide).
    vit = "vit_tiny_patch16_224"
    args = ("--scale", "tiny", "--out", str(tmp_path), "--grad-checkpointing", "--batch", "64", "--models", vit)
    _run("step_cost.py", *args)
    data = json.loads((tmp_path / "step_cost_tiny.json").read_text())
    for name, row in data["models"].items():
        if name == vit:
            assert row["runs"]["eager + checkpointing"] == row["runs"]["eager"] != first[name]
            assert "--grad-checkpointing" in row["runs"]["eager"]["command"]
            assert row["eager + checkpointing/masksub"]["peak_gib"] < row["eager/masksub"]["peak_gib"], name
        else:
            assert row["runs"] == {"eager": first[name]} and "eager + checkpointing/plain" not in row
    md = (tmp_path / "step_cost_tiny.md").read_text()
    main_rows = [line for line in md.splitlines() if line.count("|") == 15]
    assert [line.split(" | ")[2:4] for line in main_rows[2:]] == [
        ["eager", "2"],
        ["eager + checkpointing", "2"],
        ["eager", "1"],
        ["eager", "1"],
    ]
    assert (
        "\n1. `python " in md
        and "\n2. `python " in md
        and "--grad-checkpointing --batch 64 --models vit_tiny_patch16_224` on CPU" in md
    )
    # The with / without table: one row, for the one model timed both ways in one run.
    (ck,) = [line for line in md.splitlines() if line.count("|") == 8 and line.startswith("| vit")]
    row = data["models"][vit]
    peak = row["eager + checkpointing/masksub"]["peak_gib"] / row["eager/masksub"]["peak_gib"]
    assert ck.split(" | ")[2] == "eager" and ck.split(" | ")[-1] == f"{peak:.3f} |"


@needs_transformers_5
def test_text_step_cost_tiny(tmp_path):
    """A BERT, a DeBERTa v3 and a Llama classifier: every variant timed with its peak, the attention mode's
    FLOP-ideal cost the main pass's again (2x), the drop mode's less; one table row per model."""
    _run("text_step_cost.py", "--scale", "tiny", "--out", str(tmp_path))
    data = json.loads((tmp_path / "text_step_cost_tiny.json").read_text())
    assert set(data["models"]) == {"tiny-bert", "tiny-deberta", "tiny-llama"}
    assert "bf16 instructions: " in data["meta"]["hardware"]
    for row in data["models"].values():
        for variant in ("plain", "masksub:attention", "masksub:drop"):
            assert row[variant]["s_per_step"] > 0 and row[variant]["peak_gib"] > 0
        assert row["flop_ideal"]["attention"] == pytest.approx(2.0, rel=0.01)
        assert 1.4 < row["flop_ideal"]["drop"] < 1.6  # half of the longest text
    md = (tmp_path / "text_step_cost_tiny.md").read_text()
    assert "--scale tiny" in md and [line.split(" | ")[0] for line in md.splitlines() if "| 4 x 16 |" in line] == [
        "| tiny-bert",
        "| tiny-deberta",
        "| tiny-llama",
    ]


@needs_transformers_5
def test_text_step_cost_tiny_token_classifiers(tmp_path):
    """--task token: token classifiers of the same configurations, in a file of their own; dropping tokens still
    saves their share of the sub pass (the logits go back to their places, nothing more)."""
    _run(
        "text_step_cost.py",
        "--scale",
        "tiny",
        "--task",
        "token",
        "--models",
        "tiny-bert,tiny-llama",
        "--out",
        str(tmp_path),
    )
    data = json.loads((tmp_path / "text_step_cost_tiny_token.json").read_text())
    assert data["meta"]["task"] == "token" and set(data["models"]) == {"tiny-bert", "tiny-llama"}
    for row in data["models"].values():
        assert all(row[v]["s_per_step"] > 0 for v in ("plain", "masksub:attention", "masksub:drop"))
        assert row["flop_ideal"]["attention"] == pytest.approx(2.0, rel=0.01)
        assert 1.4 < row["flop_ideal"]["drop"] < 1.6  # half of the longest text
    assert "Heads: token classifiers." in (tmp_path / "text_step_cost_tiny_token.md").read_text()
    assert not (tmp_path / "text_step_cost_tiny.json").exists()


@needs_transformers_5
def test_text_step_cost_tiny_causal_language_models(tmp_path):
    """--task lm: the decoders' causal language models alone (not BERT's, DeBERTa's), in a file of their own;
    dropping tokens saves their share of the sub pass there too."""
    _run("text_step_cost.py", "--scale", "tiny", "--task", "lm", "--out", str(tmp_path))
    data = json.loads((tmp_path / "text_step_cost_tiny_lm.json").read_text())
    assert data["meta"]["task"] == "lm" and set(data["models"]) == {"tiny-llama"}
    row = data["models"]["tiny-llama"]
    assert all(row[v]["s_per_step"] > 0 for v in ("plain", "masksub:attention", "masksub:drop"))
    assert (
        row["flop_ideal"]["attention"] == pytest.approx(2.0, rel=0.01) and 1.4 < row["flop_ideal"]["drop"] < 1.6
    )  # half of the longest text
    assert "Heads: causal language models." in (tmp_path / "text_step_cost_tiny_lm.md").read_text()


@needs_transformers_5
def test_text_step_cost_tiny_masked_language_models(tmp_path):
    """--task mlm: the encoders' masked language models alone (not the Llama's), in a file of their own; the drop
    mode keeps every target and still saves a share of the sub pass."""
    _run("text_step_cost.py", "--scale", "tiny", "--task", "mlm", "--out", str(tmp_path))
    data = json.loads((tmp_path / "text_step_cost_tiny_mlm.json").read_text())
    assert data["meta"]["task"] == "mlm" and set(data["models"]) == {"tiny-bert", "tiny-deberta"}
    for row in data["models"].values():
        assert all(row[v]["s_per_step"] > 0 for v in ("plain", "masksub:attention", "masksub:drop"))
        assert row["flop_ideal"]["attention"] == pytest.approx(2.0, rel=0.01) and 1.5 < row["flop_ideal"]["drop"] < 1.95
    assert "Heads: masked language models." in (tmp_path / "text_step_cost_tiny_mlm.md").read_text()


@needs_transformers_5
def test_text_step_cost_tiny_vision_language_model(tmp_path):
    """--task vlm: a SmolVLM alone (the text models' tasks leave it out), on images and words; its vision tower
    runs in both branches, so dropping words saves less than half of the sub pass. A text model is refused there."""
    _run("text_step_cost.py", "--scale", "tiny", "--task", "vlm", "--out", str(tmp_path))
    data = json.loads((tmp_path / "text_step_cost_tiny_vlm.json").read_text())
    assert data["meta"]["task"] == "vlm" and set(data["models"]) == {"tiny-smolvlm"}
    row = data["models"]["tiny-smolvlm"]
    assert all(row[v]["s_per_step"] > 0 for v in ("plain", "masksub:attention", "masksub:drop"))
    assert row["length"] == 4 + 16  # an image's 4 tokens and up to 16 words
    assert row["flop_ideal"]["attention"] == pytest.approx(2.0, rel=0.01) and 1.5 < row["flop_ideal"]["drop"] < 1.9
    assert "Heads: a vision-language model's" in (tmp_path / "text_step_cost_tiny_vlm.md").read_text()
    _run("text_step_cost.py", "--scale", "tiny", "--task", "vlm", "--frozen-vision", "--out", str(tmp_path))
    frozen = json.loads((tmp_path / "text_step_cost_tiny_vlm_frozen.json").read_text())
    assert (
        frozen["meta"]["frozen_vision"]
        and "tower frozen" in (tmp_path / "text_step_cost_tiny_vlm_frozen.md").read_text()
    )
    ideal = frozen["models"]["tiny-smolvlm"]["flop_ideal"]  # the sub pass reuses the frozen tower's output
    assert ideal["attention"] < 1.99 and ideal["drop"] < row["flop_ideal"]["drop"]
    _run(
        "text_step_cost.py",
        "--scale",
        "tiny",
        "--task",
        "vlm",
        "--frozen-vision",
        "--no-encoder-reuse",
        "--out",
        str(tmp_path),
    )
    rerun = json.loads((tmp_path / "text_step_cost_tiny_vlm_frozen_rerun.json").read_text())["models"]["tiny-smolvlm"]
    assert rerun["flop_ideal"]["attention"] == pytest.approx(2.0, rel=0.01)  # the tower in both passes again
    proc = subprocess.run(
        [sys.executable, str(BENCH / "text_step_cost.py"), "--scale", "tiny", "--task", "vlm", "--models", "tiny-bert"]
        + ["--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert proc.returncode != 0 and "--task vlm does not take tiny-bert" in proc.stderr


def test_distill_cost_tiny(tmp_path):
    """Both losses in both precisions, timed and their peaks read; they compute the same loss."""
    _run("distill_cost.py", "--scale", "tiny", "--out", str(tmp_path))
    data = json.loads((tmp_path / "distill_cost_tiny.json").read_text())
    assert (data["meta"]["rows"], data["meta"]["classes"]) == (64, 1000) and set(data["results"]) == {"bf16", "fp32"}
    for result in data["results"].values():
        assert all(result[v]["s"] > 0 and result[v]["peak_gib"] > 0 for v in ("masksub", "whole arrays"))
        assert result["loss_difference"] < 1e-4
    assert "| bf16 |" in (tmp_path / "distill_cost_tiny.md").read_text()


def test_step_cost_times_masksub_through_another_adapter_in_the_same_rounds(tmp_path):
    """``--also-adapter pixels`` on the tiny ViT: a fifth step, MaskSub masking pixels, beside the one dropping
    tokens, with its own FLOP-ideal ratio (the main pass's cost again: 2x) and a row in its own table."""
    vit = "vit_tiny_patch16_224"
    _run("step_cost.py", "--scale", "tiny", "--out", str(tmp_path), "--models", vit, "--also-adapter", "pixels")
    row = json.loads((tmp_path / "step_cost_tiny.json").read_text())["models"][vit]
    assert {"eager/masksub", "eager/masksub:pixels"} <= set(row)
    assert row["flop_ideal_ratio:pixels"] == pytest.approx(2.0, rel=0.01) and row["flop_ideal_ratio"] < 1.7
    assert row["eager/masksub:pixels"]["s_per_step"] > 0
    md = (tmp_path / "step_cost_tiny.md").read_text()
    (line,) = [line for line in md.splitlines() if line.startswith(f"| {vit} | 4 | eager | pixels |")]
    plain = row["eager/plain"]["s_per_step"]
    assert f"| {row['eager/masksub:pixels']['s_per_step'] / plain:.3f} | 2.000 |" in line


def test_step_cost_tiny_peers_hold_both_passes_at_the_peak(tmp_path):
    """R-Drop and cosub (``--peers``) back-propagate both full passes at once: at a batch where activations set the
    peak, theirs is well above MaskSub's, whose main graph is freed before the sub pass."""
    vit = "vit_tiny_patch16_224"
    _run("step_cost.py", "--scale", "tiny", "--models", vit, "--batch", "64", "--peers", "--out", str(tmp_path))
    row = json.loads((tmp_path / "step_cost_tiny.json").read_text())["models"][vit]
    peak = {v: row[f"eager/{v}"]["peak_gib"] for v in ("plain", "masksub", "rdrop", "cosub")}
    assert peak["rdrop"] > 1.5 * peak["masksub"] and peak["cosub"] > 1.3 * peak["masksub"], peak
    assert all(row[f"eager/{v}"]["s_per_step"] > 0 for v in ("rdrop", "cosub"))
    md = (tmp_path / "step_cost_tiny.md").read_text()
    (line,) = [ln for ln in md.split("R-Drop time")[1].splitlines() if ln.startswith(f"| {vit} | 64 | eager |")]
    assert f"| {peak['rdrop'] / peak['plain']:.3f} |" in line


def test_step_cost_tiny_patch_dropout_reference_does_the_sub_pass_work(tmp_path):
    """``--patch-dropout``: a plain step of the ViT built with timm's PatchDropout at 0.5 joins the rounds; MaskSub's
    sub pass keeps as many tokens (8 of 16), so its FLOPs are the PatchDropout pass's. Swin has no ``patch_drop``
    slot in timm: no such step, no row."""
    vit, swin = "vit_tiny_patch16_224", "swin_tiny_patch4_window7_224"
    _run("step_cost.py", "--scale", "tiny", "--models", f"{vit},{swin}", "--patch-dropout", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "step_cost_tiny.json").read_text())["models"]
    assert rows[vit]["flops"]["sub"] == rows[vit]["flops"]["patchdrop"] < 0.6 * rows[vit]["flops"]["main"]
    assert rows[vit]["eager/patchdrop"]["s_per_step"] > 0
    assert "eager/patchdrop" not in rows[swin] and "patchdrop" not in rows[swin]["flops"]
    md = (tmp_path / "step_cost_tiny.md").read_text().split("PatchDropout FLOPs |")[1]
    assert [ln.split(" | ")[0] for ln in md.splitlines() if ln.startswith("| ")] == [f"| {vit}"]
    assert md.splitlines()[2].endswith("| 1.000 |")
    # A later run without the flag re-times the ViT's plain step: the PatchDropout step of the first run stays in
    # the JSON, and no ratio is taken across the two runs.
    _run("step_cost.py", "--scale", "tiny", "--models", vit, "--out", str(tmp_path))
    rows = json.loads((tmp_path / "step_cost_tiny.json").read_text())["models"]
    assert rows[vit]["eager/patchdrop"]["date"] != rows[vit]["eager/plain"]["date"]
    assert "PatchDropout" not in (tmp_path / "step_cost_tiny.md").read_text()


def test_accuracy_tiny(tmp_path):
    """Each sub branch and the plain run at MaskSub's compute, one seed (two: the --reuse test below)."""
    _run("accuracy.py", "--scale", "tiny", "--seeds", "0", "--device", "cpu", "--out", str(tmp_path))
    md = (tmp_path / "accuracy_tiny.md").read_text()
    for kind in ("none", "mask", "dropout", "droppath", "none-equal-time"):
        assert f"| {kind} |" in md
    data = json.loads((tmp_path / "accuracy_tiny.json").read_text())
    assert len(data["runs"]) == 5 and data["meta"]["equal_time_epochs"] >= 1
    assert set(data["meta"]["step_time_ratios_over_plain"]) == {"mask", "dropout", "droppath"}
    assert (tmp_path / "accuracy_tiny.png").stat().st_size > 1000


def test_accuracy_tiny_peers(tmp_path):
    """R-Drop and cosub (peers.py) run on the same trainer with their drop rates in the model, into tagged files."""
    args = ("--scale", "tiny", "--subs", "none,rdrop,cosub", "--seeds", "0", "--tag", "peers", "--device", "cpu")
    _run("accuracy.py", *args, "--out", str(tmp_path))
    data = json.loads((tmp_path / "accuracy_tiny_peers.json").read_text())
    assert set(data["meta"]["step_time_ratios_over_plain"]) == {"rdrop", "cosub"}
    assert [r["name"] for r in data["runs"]] == ["none-s0", "rdrop-s0", "cosub-s0"]  # no MaskSub: no equal-time run
    runs = tmp_path / "accuracy_tiny_peers_runs"
    for peer, rates in (("rdrop", {"drop_rate": 0.1, "attn_drop_rate": 0.1}), ("cosub", {"drop_path_rate": 0.1})):
        assert json.loads((runs / f"{peer}-s0" / "peer.json").read_text())["peer"] == peer
        config = yaml.safe_load((runs / f"{peer}-s0" / "config.yaml").read_text())
        built = {**config["model"], **config["model"]["kwargs"]}
        assert config["sub"]["kind"] == "none" and all(built[k] == v for k, v in rates.items())
    losses = {r["name"]: r["records"][-1]["train_loss_sub"] for r in data["runs"]}
    assert losses["none-s0"] is None and losses["rdrop-s0"] > 0 and losses["cosub-s0"] > 0
    md = (tmp_path / "accuracy_tiny_peers.md").read_text()
    assert "| rdrop | 0.1 | 1 |" in md and "| cosub | 0.1 | 1 |" in md
    assert (tmp_path / "accuracy_tiny_peers.png").is_file() and not (tmp_path / "accuracy_tiny.json").exists()


def test_accuracy_ratios_only(tmp_path):
    _run("accuracy.py", "--scale", "tiny", "--ratios-only", "--device", "cpu", "--out", str(tmp_path))
    ratios = json.loads((tmp_path / "accuracy_tiny_cost.json").read_text())["step_time_ratios_over_plain"]
    assert set(ratios) == {"mask", "dropout", "droppath"} and all(r > 0 for r in ratios.values())
    assert "| droppath | 0.2 |" in (tmp_path / "accuracy_tiny_cost.md").read_text()
    assert not (tmp_path / "accuracy_tiny.json").exists(), "--ratios-only trains nothing"


def test_accuracy_reuse_adds_seeds_on_the_recorded_cost_ratio(tmp_path):
    args = ("accuracy.py", "--scale", "tiny", "--subs", "none,mask", "--device", "cpu", "--out", str(tmp_path))
    _run(*args, "--seeds", "0")
    result = tmp_path / "accuracy_tiny.json"
    data = json.loads(result.read_text())
    (timed,) = (tmp_path / "accuracy_tiny_runs").glob("none-equal-time-*ep-s0")
    # A ratio that the timing did not give (it may be anything on a busy machine): 2 epochs more than it gave, for
    # the plain run at MaskSub's compute (tiny runs are 1 epoch).
    epochs = int(timed.name.removeprefix("none-equal-time-").partition("ep")[0]) + 2
    data["meta"]["step_time_ratios_over_plain"]["mask"] = float(epochs)
    result.write_text(json.dumps(data))
    _run(*args, "--seeds", "0,1", "--reuse")
    data = json.loads(result.read_text())
    assert data["meta"]["step_time_ratio_mask_over_plain"] == epochs and data["meta"]["equal_time_epochs"] == epochs
    folders = {p.name for p in (tmp_path / "accuracy_tiny_runs").iterdir()} - {timed.name}
    # seed 0's plain and MaskSub runs are read, not rerun (a rerun would take the next free folder, name-1)
    assert folders == {f"{k}-s{s}" for k in ("mask", "none", f"none-equal-time-{epochs}ep") for s in (0, 1)}
    assert f"| mask | 0.5 | 1 | {epochs:.2f} |" in (tmp_path / "accuracy_tiny.md").read_text()


def test_accuracy_tiny_resnet(tmp_path):
    _run(
        "accuracy.py",
        "--scale",
        "tiny",
        "--model",
        "resnet",
        "--subs",
        "none,mask",
        "--seeds",
        "0",
        "--out",
        str(tmp_path),
    )
    data = json.loads((tmp_path / "accuracy_tiny_resnet.json").read_text())
    assert data["meta"]["model"]["name"] == "resnet18" and data["meta"]["model"]["mask_unit_px"] == 4
    assert [r["name"] for r in data["runs"]][:2] == ["none-s0", "mask-s0"] and len(data["runs"]) == 3
    assert "| mask | 0.5 |" in (tmp_path / "accuracy_tiny_resnet.md").read_text()


def test_accuracy_tiny_swin_masks_with_the_token_and_by_dropping(tmp_path):
    """The Swin's MaskSub rows: the mask token (the default adapter) and ``swin_drop`` (``mask_drop``), each with a
    plain run at its compute; two variants given the same epochs share those runs."""
    _run(
        "accuracy.py",
        *("--scale", "tiny", "--model", "swin", "--subs", "none,mask,mask_drop", "--seeds", "0"),
        *("--device", "cpu", "--out", str(tmp_path)),
    )
    runs_dir = tmp_path / "accuracy_tiny_swin_runs"
    for run, adapter in (("mask-s0", None), ("mask_drop-s0", "swin_drop")):
        sub = yaml.safe_load((runs_dir / run / "config.yaml").read_text())["sub"]
        assert (sub["kind"], sub["unit"], sub["adapter"]) == ("mask", 4, adapter)
    data = json.loads((tmp_path / "accuracy_tiny_swin.json").read_text())
    eq = data["meta"]["equal_time_epochs_per_variant"]
    assert set(eq) == {"mask", "mask_drop"} and set(data["meta"]["step_time_ratios_over_plain"]) == set(eq)
    names = [r["name"] for r in data["runs"]]
    assert len(names) == len(set(names)) == 3 + len(set(eq.values()))
    md = (tmp_path / "accuracy_tiny_swin.md").read_text()
    for row in ("mask_drop | 0.5", f"none-equal-time | - | {eq['mask']} |", f"(mask_drop) | - | {eq['mask_drop']} |"):
        assert row in md


def test_accuracy_refuses_a_sub_branch_that_does_not_fit(tmp_path):
    for subs, message in (("none,mask_drop", "mask_drop fits --model swin only"), ("none,maks", "unknown sub branch")):
        proc = subprocess.run(
            [sys.executable, str(BENCH / "accuracy.py"), "--scale", "tiny", "--subs", subs, "--out", str(tmp_path)],
            capture_output=True,
            text=True,
            env=ENV,
        )
        assert proc.returncode == 2 and message in proc.stderr
    assert not any(tmp_path.iterdir()), "refused before anything is written"


@pytest.mark.parametrize("encoder", ["vit", "convvit"])
def test_pretrain_tiny(tmp_path, encoder):
    _run(
        "pretrain.py", "--scale", "tiny", "--encoder", encoder, "--device", "cpu", "--jobs", "2", "--out", str(tmp_path)
    )
    label = "tiny" if encoder == "vit" else "tiny_convvit"
    md = (tmp_path / f"pretrain_{label}.md").read_text()
    for name in ("dmjd", "single", "single-equal-time", "none (from scratch)"):
        assert f"| {name} |" in md
    assert md.count("ConViT {") == (encoder == "convvit")
    data = json.loads((tmp_path / f"pretrain_{label}.json").read_text())
    assert (
        data["meta"]["setting"]["name"] == {"vit": "vit_tiny_patch16_224", "convvit": "convvit_base_patch16"}[encoder]
    )
    runs, equal = data["runs"], data["meta"]["equal_time_epochs"]
    assert equal == max(1, round(data["meta"]["step_time_ratio_dmjd_over_single"]))  # 1 epoch x the ratio
    assert [runs[n]["epochs"] for n in ("dmjd", "single", "single-equal-time")] == [1, 1, equal]
    for name in ("dmjd", "single", "single-equal-time"):
        assert 0 <= runs[name]["linprobe_top1"] <= 100 and 0 <= runs[name]["finetune_top1"] <= 100
    assert 0 <= runs["scratch"]["final_top1"] <= 100


def test_run_cli_never_reads_a_stale_run_and_continues_an_unfinished_one(tmp_path, monkeypatch):
    """Benchmarks read the run they started (an older one of the same name stays), and --reuse resumes."""
    import torch
    from test_trainer import TINY

    from masksub.train import checkpoint

    monkeypatch.syspath_prepend(str(BENCH))
    from common import run_cli

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    tiny = {**TINY, "train.device": "cpu"}
    older = run_cli("train", "r", {**tiny, "sched.epochs": 1}, tmp_path)
    fresh = run_cli("train", "r", tiny, tmp_path)  # 2 epochs; "r" is taken, so the run goes to r-1
    assert [len(older["records"]), len(fresh["records"])] == [1, 2] and (tmp_path / "r-1" / "last.pt").is_file()
    assert [older["folder"], fresh["folder"]] == ["r", "r-1"], "callers find the run's files (an encoder) there"
    assert run_cli("train", "r", {**tiny, "sched.epochs": 1}, tmp_path, reuse=True)["wall_s"] is None  # read

    stopped = run_cli("train", "p", {**tiny, "train.max_steps": 5}, tmp_path)  # 4 steps per epoch: stops in epoch 2
    assert len(stopped["records"]) == 1
    resumed = run_cli("train", "p", tiny, tmp_path, reuse=True)
    assert len(resumed["records"]) == 2 and not (tmp_path / "p-1").exists(), "continued in place"
    a, b = checkpoint.load(tmp_path / "r-1" / "last.pt"), checkpoint.load(tmp_path / "p" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), "as if never stopped"


def test_pretrain_throughput_times_both_backbones(monkeypatch):
    """The GPU throughput part (ViT-B/16 and ConViT-B, DMJD and single view) at a CPU size: it runs and reports."""
    monkeypatch.syspath_prepend(str(BENCH))
    from pretrain import throughput, throughput_line

    tiny = {
        "ViT-B/16": dict(depth=1, embed_dim=32, num_heads=2),
        "ConViT-B": dict(embed_dim=(8, 16, 32), depth=(1, 1, 1), num_heads=2),
    }
    t = throughput(batch=2, steps=1, device="cpu", size=64, encoder_kwargs=tiny)  # 4x4 tokens each
    assert {label: sorted(m) for label, m in t.items()} == {
        "ViT-B/16": ["dmjd", "single"],
        "ConViT-B": ["dmjd", "single"],
    }
    line = throughput_line(t)
    assert "ConViT-B, 64 px, batch 2, fp32: dmjd" in line and line.count("DMJD / single-view step time") == 2


FAKE_STEP_COST = """#!/usr/bin/env bash
# stands in for python: benchmarks/step_cost.py appends its compile mode to <--out>/step_cost.json, then
# exits with $FAKE_RC (a time limit cutting the part off after it measured)
out=${@: -1}
echo -n "${3}," >> "$out/step_cost.json"
exit ${FAKE_RC:-0}
"""


@pytest.mark.parametrize("cut_off", [False, True])
def test_run_gpu_writes_step_cost_into_dest_as_it_goes(tmp_path, cut_off):
    """With DEST, a step-cost part starts from the committed results (parts merge) and writes into DEST
    as it goes, so what a part measured before a time limit killed it is in DEST."""
    repo = tmp_path / "repo"
    (repo / "benchmarks" / "results").mkdir(parents=True)
    (repo / "benchmarks" / "run_gpu.sh").write_text((BENCH / "run_gpu.sh").read_text())
    (repo / "benchmarks" / "results" / "step_cost.json").write_text("eager,")  # the committed eager part
    fake = tmp_path / "python"
    fake.write_text(FAKE_STEP_COST)
    fake.chmod(0o755)
    dest = tmp_path / "dest"
    env = {**ENV, "PYTHON": str(fake), "FAKE_RC": "137" if cut_off else "0"}
    proc = subprocess.run(
        ["bash", "benchmarks/run_gpu.sh", "compiled", str(dest)], cwd=repo, env=env, capture_output=True, text=True
    )
    assert proc.returncode == (137 if cut_off else 0), proc.stderr
    assert (dest / "step_cost.json").read_text() == "eager,on,"
    committed = (repo / "benchmarks" / "results" / "step_cost.json").read_text()
    assert committed == ("eager," if cut_off else "eager,on,")  # copied back only by a part that finished


FAKE_ESSENTIALS = """#!/usr/bin/env bash
# stands in for python: logs its arguments; step_cost.py appends its compile mode to <--out>/step_cost.json and
# exits with $FAKE_RC (a stage cut off by its timeout exits 124); the GPU tests exit with $FAKE_TEST_RC
echo "$*" >> "$FAKE_LOG"
case "$*" in
  *"-m pytest"*) exit ${FAKE_TEST_RC:-0} ;;
  *"--compile off"*) echo -n "off," >> "${@: -1}/step_cost.json" ;;
  *"--compile on"*) echo -n "on," >> "${@: -1}/step_cost.json" ;;
esac
exit ${FAKE_RC:-0}
"""


@pytest.mark.parametrize("fail", [False, True])
def test_run_gpu_essentials_runs_every_stage(tmp_path, fail):
    """The short-lease part runs the GPU tests, the eager step cost of the 4 models and the compiled one of the ViTs,
    in that order, each under a timeout; a stage that fails or is cut off leaves the next ones to run, and what
    each measured lands in DEST and in the results."""
    repo = tmp_path / "repo"
    (repo / "benchmarks" / "results").mkdir(parents=True)
    (repo / "benchmarks" / "run_gpu.sh").write_text((BENCH / "run_gpu.sh").read_text())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("python", FAKE_ESSENTIALS), ("nvidia-smi", "#!/usr/bin/env bash\necho 'name\nH100'\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    dest, log = tmp_path / "dest", tmp_path / "calls.log"
    env = {**ENV, "PATH": f"{bin_dir}:{ENV['PATH']}", "PYTHON": str(bin_dir / "python"), "FAKE_LOG": str(log)}
    if fail:  # the tests fail, every step-cost stage is cut off by its timeout after it measured
        env.update(FAKE_RC="124", FAKE_TEST_RC="1")
    proc = subprocess.run(
        ["bash", "benchmarks/run_gpu.sh", "essentials", str(dest)], cwd=repo, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    assert len(calls) == 3 and calls[0].startswith("-m pytest -q -p no:cacheprovider -o addopts= tests/test_gpu.py")
    assert calls[1].startswith("benchmarks/step_cost.py --compile off") and "--models" not in calls[1]
    assert calls[2].startswith("benchmarks/step_cost.py --compile on")
    assert "--models deit3_small_patch16_224,deit3_base_patch16_224" in calls[2]
    assert (dest / "step_cost.json").read_text() == "off,on,"
    assert (repo / "benchmarks" / "results" / "step_cost.json").read_text() == "off,on,"
    tests_log = (dest / "gpu_tests.log").read_text()
    assert tests_log.startswith("name\nH100") and ("FAILED or cut off" in tests_log) == fail


def test_the_gpu_tests_collect_without_pytest_xdist():
    """run_gpu.sh's pytest command where pytest-xdist is not installed (a device machine's carried packages):
    the suite's xdist settings stay out of its way."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider", "-o", "addopts="]
    proc = subprocess.run([*cmd, "--collect-only", "tests/test_gpu.py"], cwd=BENCH.parent, env=ENV, capture_output=True)
    assert proc.returncode == 0, proc.stdout.decode()[-2000:] + proc.stderr.decode()[-2000:]


def test_data_sources_tiny(tmp_path):
    _run("data_sources.py", "--scale", "tiny", "--out", str(tmp_path))
    data = json.loads((tmp_path / "data_sources_tiny.json").read_text())
    assert set(data["results"]) == {"folder", "tar", "parquet", "webdataset"} and data["meta"]["images"] == 48
    assert all(r["images_per_s"] > 0 and len(r["read_s"]) == 1 for r in data["results"].values())
    md = (tmp_path / "data_sources_tiny.md").read_text()
    assert md.startswith("Command: `python benchmarks/data_sources.py --scale tiny --out ") and "| tar | " in md


def _wordnet(folder: Path, per_class: int = 10) -> Path:
    """WordNet's data files in their format (a license header, then synset lines: offset, lexicographer file, part,
    words, pointers | gloss), with made-up glosses: ``per_class`` synsets of each of the 45 lexicographer files."""
    import random

    rng = random.Random(0)
    words = [f"w{i}" for i in range(200)]
    folder.mkdir()
    lines = {
        part: ["  1 This software and database is being provided to you...\n"]
        for part in ("noun", "verb", "adj", "adv")
    }
    for label in range(45):
        part = "adj" if label in (0, 1, 44) else "adv" if label == 2 else "noun" if label < 29 else "verb"
        for i in range(per_class):
            gloss = " ".join([f"cue{label}", *rng.sample(words, 6)]) + f'; "an example {i}"'
            lines[part].append(f"{label:08d}{i:02d} {label:02d} {part[0]} 01 word{i} 0 000 | {gloss}  \n")
    for part, text in lines.items():
        (folder / f"data.{part}").write_text("".join(text))
    return folder


@needs_transformers_5  # the mask_drop runs
def test_text_accuracy_tiny(tmp_path):
    wordnet = _wordnet(tmp_path / "wordnet")
    _run(
        "text_accuracy.py",
        "--scale",
        "tiny",
        "--seeds",
        "0",
        "--subs",
        "none,mask,mask_drop",
        "--wordnet",
        str(wordnet),
        "--out",
        str(tmp_path / "results"),
    )
    data = json.loads((tmp_path / "results" / "text_accuracy_tiny.json").read_text())
    assert data["data"]["train"] == 256 and 0 < data["data"]["test"] <= 128 and data["data"]["classes"] == 45
    assert [row["name"] for row in data["table"]] == ["none", "mask", "mask_drop", "none_equal_time"]
    assert [r["mode"] for r in data["runs"]] == [None, "token", "drop", None]
    equal = data["table"][-1]["epochs"]
    assert equal == round(data["cost_vs_plain"]["mask"], 2)  # one epoch, scaled by the measured cost
    for run in data["runs"]:
        assert 0.0 <= run["eval_accuracy"] <= 1.0 and run["history"] and run["train_seconds"] > 0
    md = (tmp_path / "results" / "text_accuracy_tiny.md").read_text()
    assert "| mask_drop | 1 |" in md and "45 supersenses" in md
    assert (tmp_path / "results" / "text_accuracy_tiny.png").stat().st_size > 1000


def test_text_accuracy_names_missing_and_damaged_wordnet_files(tmp_path):
    def run(wordnet: Path) -> str:
        proc = subprocess.run(
            [
                sys.executable,
                str(BENCH / "text_accuracy.py"),
                "--scale",
                "tiny",
                "--wordnet",
                str(wordnet),
                "--out",
                str(tmp_path / "results"),
            ],
            capture_output=True,
            text=True,
            env=ENV,
            timeout=300,
        )
        assert proc.returncode != 0
        return proc.stderr

    assert "install Debian's wordnet-base" in run(tmp_path / "nowhere")
    wordnet = _wordnet(tmp_path / "wordnet", per_class=1)
    with (wordnet / "data.verb").open("a") as f:
        f.write("00000099 77 v 01 word 0 000 | a lexicographer file past the 45\n")
    assert "data.verb:" in run(wordnet) and "not a WordNet synset line" in run(wordnet)


@needs_transformers_5  # the mask_drop runs
def test_text_pretrain_tiny(tmp_path):
    """Masked-LM pretraining plain and with MaskSub (token, drop), plain at the token mode's compute, then each
    model and one not pretrained fine-tuned plain: every run scored, the tables and the plot written."""
    _run(
        "text_pretrain.py",
        "--scale",
        "tiny",
        "--seeds",
        "0",
        "--wordnet",
        str(_wordnet(tmp_path / "wordnet")),
        "--out",
        str(tmp_path / "results"),
    )
    data = json.loads((tmp_path / "results" / "text_pretrain_tiny.json").read_text())
    assert data["data"]["train"] == 256 and data["data"]["tune"] == 128 and data["mlm_probability"] == 0.15
    names = ["no_pretraining", "none", "mask", "mask_drop", "none_equal_time"]
    assert [row["name"] for row in data["table"]] == names
    assert [r["mode"] for r in data["pretrained"]] == [None, "token", "drop", None]
    assert data["table"][-1]["pretrain_epochs"] == round(data["cost_vs_plain"]["mask"], 2)
    assert [r["name"] for r in data["tuned"]] == names and all(r["sub"] == "none" for r in data["tuned"])
    for run in data["pretrained"] + data["tuned"]:
        assert 0.0 <= run["eval_accuracy"] <= 1.0 and run["history"] and run["train_seconds"] > 0
    held_out = {r["name"]: r["eval_loss"] for r in data["pretrained"]}
    assert len({held_out[n] for n in ("none", "mask", "mask_drop")}) == 3, "each scored on the same targets, to its own"
    # the plain run at the token mode's time trains ceil(epochs x steps an epoch) steps (the Trainer's count): on a
    # loaded machine the measured ratio may round back to the plain run's steps, which then trains the same weights
    steps = data["data"]["train"] // data["scale"]["batch"]
    same = math.ceil(data["table"][-1]["pretrain_epochs"] * steps) == data["scale"]["epochs"] * steps
    assert (held_out["none_equal_time"] == held_out["none"]) == same
    work = tmp_path / "results" / "text_pretrain_tiny_runs"
    assert (work / "train.txt").read_text().count("\n") == 256
    assert (work / "tune.csv").read_text().count("\n") == 129  # the header and 128 glosses
    md = (tmp_path / "results" / "text_pretrain_tiny.md").read_text()
    assert "| no_pretraining | 0 | - | - | - |" in md and "| mask_drop | 1 |" in md
    assert (tmp_path / "results" / "text_pretrain_tiny.png").stat().st_size > 1000
