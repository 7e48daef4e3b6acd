"""The DeepSpeed JSON: shipped configs, "auto" resolution, patches, and clear errors before training."""
import json
import subprocess
import sys

import pytest

from minbert.distributed.config import (CONFIG_DIR, DeepSpeedConfigError, check_with_deepspeed, load_ds_config,
                                        resolve_ds_config)
from minbert.train_config import load_config

SHIPPED = ["zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload"]


def _cfg(*overrides):
    return load_config(None, ["tasks=sst,sts", "tasks.sst.batch_size=4", "tasks.sts.batch_size=4", *overrides])


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_resolve_and_pass_deepspeeds_own_checks(name):
    ds = resolve_ds_config(load_ds_config(CONFIG_DIR / f"{name}.json"), _cfg("optim.grad_accum=3"), world_size=2,
                           cuda=False)
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 4 * 3 * 2
    assert ds["gradient_clipping"] == 1.0
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False  # fp32 on the CPU
    assert ds["zero_optimization"]["stage"] == int(name[4])
    assert "auto" not in json.dumps(ds)
    if "offload" in name:
        assert ds["optimizer"]["params"] == {"lr": 2e-5, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}
    check_with_deepspeed(ds)


def test_precision_auto_picks_bf16_on_a_bf16_gpu_and_flags_patch_it():
    base = load_ds_config("zero2")
    assert resolve_ds_config(base, _cfg(), 2, cuda=True, bf16_supported=True)["bf16"]["enabled"] is True
    gpu_old = resolve_ds_config(load_ds_config("zero2", precision="auto"), _cfg(), 2, cuda=True, bf16_supported=False)
    assert gpu_old["fp16"]["enabled"] is True and gpu_old["bf16"]["enabled"] is False
    fp32 = resolve_ds_config(load_ds_config("zero2", precision="fp32"), _cfg(), 2, cuda=True, bf16_supported=True)
    assert fp32["bf16"]["enabled"] is False and fp32["fp16"]["enabled"] is False
    with pytest.raises(DeepSpeedConfigError, match="fp16 training needs a GPU"):
        resolve_ds_config(load_ds_config("zero2", precision="fp16"), _cfg(), 2, cuda=False)
    # the trainer's autocast: bf16 on top of an engine in bf16 or fp32 is fine, on top of fp16 refused
    for precision in ("bf16", "fp32"):
        resolve_ds_config(load_ds_config("zero2", precision=precision), _cfg("autocast=bf16"), 2, cuda=True,
                          bf16_supported=True)
    with pytest.raises(DeepSpeedConfigError, match=r"autocast: 'bf16' with fp16.enabled.*pick one precision"):
        resolve_ds_config(load_ds_config("zero2", precision="fp16"), _cfg("autocast=bf16"), 2, cuda=True)


def test_patches_edit_the_json():
    ds = load_ds_config("zero2", ["zero_optimization.stage=1", "zero_optimization.reduce_bucket_size=5e7",
                                  "gradient_clipping=0.5", "new_block.flag=true"])
    assert ds["zero_optimization"]["stage"] == 1
    assert ds["zero_optimization"]["reduce_bucket_size"] == 5e7
    assert ds["gradient_clipping"] == 0.5 and ds["new_block"] == {"flag": True}
    with pytest.raises(DeepSpeedConfigError, match="expects key=value"):
        load_ds_config("zero2", ["zero_optimization.stage"])


@pytest.mark.parametrize("stage", [4, -1, "2", None, True])
def test_unknown_zero_stage_is_refused(stage):
    with pytest.raises(DeepSpeedConfigError, match=r"zero_optimization.stage: .* is not a ZeRO stage; expected one of \[0, 1, 2, 3\]"):
        load_ds_config({"zero_optimization": {"stage": stage}})


def test_batch_arithmetic_is_checked():
    with pytest.raises(DeepSpeedConfigError, match=r"train_batch_size=16 is not train_micro_batch_size_per_gpu \(4\) × "
                                                   r"gradient_accumulation_steps \(1\) × world size \(2\) = 8"):
        resolve_ds_config(load_ds_config("zero2", ["train_batch_size=16"]), _cfg(), world_size=2)
    ok = resolve_ds_config(load_ds_config("zero2", ["train_batch_size=16"]), _cfg(), world_size=4)
    assert ok["train_batch_size"] == 16
    with pytest.raises(DeepSpeedConfigError, match="train_micro_batch_size_per_gpu=8 disagrees with the recipe"):
        resolve_ds_config(load_ds_config("zero2", ["train_micro_batch_size_per_gpu=8"]), _cfg(), world_size=2)
    with pytest.raises(DeepSpeedConfigError, match="gradient_accumulation_steps=2 disagrees with the recipe's optim.grad_accum=1"):
        resolve_ds_config(load_ds_config("zero2", ["gradient_accumulation_steps=2"]), _cfg(), world_size=2)
    with pytest.raises(DeepSpeedConfigError, match="must be a positive integer"):
        resolve_ds_config(load_ds_config("zero2", ["train_batch_size=0"]), _cfg(), world_size=2)


def test_other_bad_json_is_refused(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 2},}')
    with pytest.raises(DeepSpeedConfigError, match="not valid JSON"):
        load_ds_config(bad)
    with pytest.raises(DeepSpeedConfigError, match="does not exist"):
        load_ds_config(tmp_path / "missing.json")
    with pytest.raises(DeepSpeedConfigError, match="recipe's optim.schedule drives the learning rate"):
        resolve_ds_config({"optimizer": {"type": "AdamW", "params": {}}, "scheduler": {"type": "WarmupLR"}}, _cfg(), 1)
    with pytest.raises(DeepSpeedConfigError, match="\"auto\" is not understood for zero_optimization.reduce_bucket_size"):
        resolve_ds_config({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}, _cfg(), 1)
    with pytest.raises(DeepSpeedConfigError, match="DeepSpeed rejected the config"):
        check_with_deepspeed(resolve_ds_config({"zero_optimization": {"stage": 2, "no_such_option": 1}}, _cfg(), 1))


# --- through the launcher: every one of these fails before any process group or model exists ---

def _launch_main(monkeypatch, capsys, tmp_path, *args, world=2):
    from minbert.distributed.launch import main

    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    out = tmp_path / "run"
    code = main(["--set", f"output_dir={out}", "--set", "tasks=sst,sts", "--set", "tasks.sst.batch_size=4",
                 "--set", "tasks.sts.batch_size=4", *map(str, args)])
    return code, capsys.readouterr().err, out


@pytest.mark.parametrize("args, message", [
    (["--deepspeed_config", "zero2", "--ds-set", "zero_optimization.stage=5"], "zero_optimization.stage: 5 is not a ZeRO stage"),
    (["--deepspeed_config", "zero2", "--ds-set", "train_batch_size=12"], "train_batch_size=12 is not train_micro_batch_size_per_gpu (4)"),
    (["--deepspeed_config", "zero3", "--set", "weighting.name=pcgrad"], "not supported with ZeRO stage 3"),
    (["--deepspeed_config", "zero3", "--set", "weighting.name=gse"], "DeepSpeed issues #3539 and #7352"),
    (["--deepspeed_config", "zero3", "--set", "weighting.name=uncertainty"], "'uncertainty' is not supported with ZeRO stage 3"),
    (["--deepspeed_config", "zero3", "--set", "smart={}"], "smart is not supported with ZeRO stage 3"),
    (["--deepspeed_config", "zero3", "--set", "ema=0.99"], "ema (weight averaging for evaluation) is not supported"),
    (["--deepspeed_config", "nope"], "does not exist (shipped configs: ['zero0', 'zero1', 'zero2'"),
    (["--deepspeed_config", "zero2", "--set", "optim.lrr=1"], "unknown config key 'optim.lrr'"),
])
def test_launcher_reports_bad_configs_before_training(monkeypatch, capsys, tmp_path, args, message):
    code, err, out = _launch_main(monkeypatch, capsys, tmp_path, *args)
    assert code == 2
    assert message in err and "[rank 0]: error:" in err
    assert not out.exists()  # nothing was trained or written


def test_launcher_bad_json_fails_fast_on_every_rank(tmp_path, launch, recipe):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_batch_size": 64, "zero_optimization": {"stage": 2}}))
    proc = launch(recipe(4), bad, "--set", f"output_dir={tmp_path / 'run'}", check=False, timeout=120)
    assert proc.returncode != 0
    assert "train_batch_size=64 is not train_micro_batch_size_per_gpu (4) × gradient_accumulation_steps (1) × " \
           "world size (2) = 8" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_launcher_help_runs_without_deepspeed_launcher():
    proc = subprocess.run([sys.executable, "-m", "minbert.distributed.launch", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "--deepspeed_config" in proc.stdout
