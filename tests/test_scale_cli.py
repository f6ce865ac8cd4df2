"""`ldm-lightning fit` through LightningCLI: composed configs, W&B offline read-back, pinned run id,
resume with ckpt_path=last, config errors, --print_config."""

from __future__ import annotations

import glob
import pytest
import yaml

from scale_run import TRAINER_CFG, ckpt_every, run_cli, tiny_stage, write_yaml
from wandb_reader import find_runs, read_run

from ldm_lightning.training.wandb_logger import RUN_ID_FILE, resolve_run_id

FAST = ["--trainer.log_every_n_steps", "5", "--trainer.limit_val_batches", "1"]


def test_trainer_configs_parse():
    names = {p.name for p in TRAINER_CFG.glob("*.yaml")}
    assert {"cpu-debug.yaml", "single-gpu.yaml", "ddp-8gpu.yaml", "multinode-ddp.yaml",
            "deepspeed-zero2.yaml", "deepspeed-zero3.yaml"} <= names
    for name in names - {"cpu-debug.yaml"}:
        t = yaml.safe_load((TRAINER_CFG / name).read_text())["trainer"]
        if name == "fsdp2.yaml":  # bf16 is FSDP2's MixedPrecisionPolicy (param_dtype auto: bf16 on CUDA), not autocast
            assert t["precision"] == "32-true" and t["strategy"]["init_args"]["param_dtype"] == "auto", name
        else:
            assert t["precision"] == "bf16-mixed", name
        assert t["gradient_clip_val"] > 0 and t["accumulate_grad_batches"] >= 1, name
        kinds = [c["class_path"].rsplit(".", 1)[1] for c in t["callbacks"]]
        assert "StepCheckpoint" in kinds and "TelemetryCallback" in kinds, name
        assert t["logger"]["class_path"].endswith("PinnedWandbLogger"), name
    assert yaml.safe_load((TRAINER_CFG / "deepspeed-zero3.yaml").read_text())["trainer"]["strategy"]["init_args"]["stage"] == 3


def test_fit_logs_to_wandb_offline_and_resumes_same_run(tmp_path):
    stage = tiny_stage(tmp_path, log_image=True)
    cfgs = ["-c", stage, "-c", str(TRAINER_CFG / "cpu-debug.yaml"), "-c", ckpt_every(tmp_path, 10)]
    run_cli(["fit", *cfgs, *FAST, "--trainer.max_steps", "10", "--trainer.val_check_interval", "10"], tmp_path)

    root = tmp_path / "run"
    run_id = (root / RUN_ID_FILE).read_text().strip()
    ckpts = sorted(p.name for p in root.glob(f"ldm-lightning/{run_id}/checkpoints/*.ckpt"))
    assert "last.ckpt" in ckpts and "epoch=0-step=10.ckpt" in ckpts, ckpts
    (first,) = find_runs(str(root))
    run = read_run(first)
    assert run.run_id == run_id
    # metrics: training loss + telemetry keys with sane values
    losses = run.values("train/loss")
    assert losses and all(0 < v < 10 for v in losses)
    ips = run.values("perf/images_per_sec")
    assert ips and all(v > 0 for v in ips)
    assert all(0 <= v <= 1 for v in run.values("perf/loader_stall_frac"))
    assert run.values("perf/samples_seen")[-1] == 40  # 10 steps × batch 4, counted, not assumed
    assert run.values("perf/flops_per_sample")[0] == 3 * 2 * 64 * 9 * (1 * 8 + 8 * 1)  # two 3×3 convs, 8×8 px
    assert "val/loss" in run.summary
    # the fully resolved config, as W&B run config
    assert run.config["model"]["class_path"] == "scale_tiny.TinyModule"
    assert run.config["model"]["init_args"]["width"] == 8
    assert run.config["trainer"]["max_steps"] == 10 and run.config["seed_everything"] == 0
    # an image
    assert any(f.endswith(".png") for f in run.media_files), run.media_files

    # resume in the same dir: continues from step 10 and logs into the SAME W&B run id
    run_cli(["fit", *cfgs, *FAST, "--trainer.max_steps", "20", "--ckpt_path", "last"], tmp_path)
    runs = find_runs(str(root))
    assert len(runs) == 2
    second = read_run(runs[1])
    assert second.run_id == run_id
    steps = second.values("trainer/global_step")
    assert min(steps) >= 10, steps  # resumed, not restarted from 0
    ckpts = glob.glob(str(root / "ldm-lightning" / run_id / "checkpoints" / "*step=20.ckpt"))
    assert ckpts, "the resumed run did not reach step 20"


def test_run_id_pinning_order(tmp_path):
    assert resolve_run_id(tmp_path, {"WANDB_RUN_ID": "abc", "SLURM_JOB_ID": "7"}) == "abc"
    assert resolve_run_id(tmp_path, {"SLURM_JOB_ID": "7"}) == "slurm-7"
    assert resolve_run_id(tmp_path, {"SLURM_JOB_ID": "9", "SLURM_ARRAY_JOB_ID": "7",
                                     "SLURM_ARRAY_TASK_ID": "3"}) == "slurm-7_3"
    first = resolve_run_id(tmp_path, {})
    assert (tmp_path / RUN_ID_FILE).read_text().strip() == first
    assert resolve_run_id(tmp_path, {}) == first  # a resume in the same dir continues the run
    assert resolve_run_id(tmp_path / "other", {}) != first


def test_config_error_names_the_field(tmp_path):
    stage = tiny_stage(tmp_path)
    proc = run_cli(["fit", "-c", stage, "-c", str(TRAINER_CFG / "cpu-debug.yaml"),
                    "--model.init_args.optim.lr", "-1"], tmp_path, check=False)
    assert proc.returncode != 0
    assert "optim.lr must be > 0" in proc.stderr, proc.stderr[-2000:]
    proc = run_cli(["fit", "-c", stage, "-c", str(TRAINER_CFG / "cpu-debug.yaml"),
                    "--model.init_args.optim.schedule", "linear"], tmp_path, check=False)
    assert proc.returncode != 0 and "'constant', 'cosine'" in proc.stderr, proc.stderr[-2000:]


def test_print_config_resolves_composed_configs(tmp_path):
    stage = tiny_stage(tmp_path)
    proc = run_cli(["fit", "-c", stage, "-c", str(TRAINER_CFG / "deepspeed-zero2.yaml"),
                    "--trainer.accelerator", "cpu", "--print_config"], tmp_path)
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["model"]["class_path"] == "scale_tiny.TinyModule"
    assert cfg["trainer"]["strategy"]["init_args"]["stage"] == 2
    assert cfg["trainer"]["accelerator"] == "cpu" and cfg["trainer"]["precision"] == "bf16-mixed"
    assert cfg["seed_everything"] == 0


def test_old_wandb_logger_class_path_works_with_one_deprecation_line(tmp_path):
    """training/wandb_utils.py was renamed wandb_logger.py; a config naming the old class_path keeps working for
    one release, saying once on stderr what to write instead."""
    stage = tiny_stage(tmp_path)
    old = write_yaml(tmp_path / "old_logger.yaml", "trainer:\n  logger:\n    class_path: "
                     "ldm_lightning.training.wandb_utils.PinnedWandbLogger\n    init_args: {offline: true}\n")
    proc = run_cli(["fit", "-c", stage, "-c", str(TRAINER_CFG / "cpu-debug.yaml"), "-c", old, "--print_config"],
                   tmp_path)
    assert yaml.safe_load(proc.stdout)["trainer"]["logger"]["class_path"].endswith("PinnedWandbLogger")
    lines = [ln for ln in proc.stderr.splitlines() if "wandb_utils" in ln]
    assert len(lines) == 1 and "deprecated" in lines[0] and "training.wandb_logger.PinnedWandbLogger" in lines[0], \
        proc.stderr[-2000:]


def test_anydevice_deepspeed_strategies_registered():
    from lightning.pytorch.strategies import StrategyRegistry

    from ldm_lightning.training.strategies import AnyDeviceDeepSpeedStrategy, register_strategies

    register_strategies()  # what `ldm-lightning fit|validate|test` calls at its entry (importing registers nothing)
    register_strategies()  # idempotent
    for name in ("deepspeed_anydevice", "deepspeed_stage_1_anydevice", "deepspeed_stage_2_anydevice",
                 "deepspeed_stage_3_anydevice", "deepspeed_stage_3_offload_anydevice"):
        assert StrategyRegistry[name]["strategy"] is AnyDeviceDeepSpeedStrategy, name
    assert StrategyRegistry["deepspeed_stage_3_anydevice"]["init_params"]["stage"] == 3


def test_fit_with_registered_deepspeed_strategy_name(tmp_path):
    """`--trainer.strategy deepspeed_stage_2_anydevice` (the name cpu-debug.yaml documents) through the console
    entry: the CLI registers the name itself; the run trains and writes a DeepSpeed checkpoint directory."""
    stage = tiny_stage(tmp_path)
    run_cli(["fit", "-c", stage, "-c", str(TRAINER_CFG / "cpu-debug.yaml"), "--trainer.logger", "false",
             "--trainer.strategy", "deepspeed_stage_2_anydevice", "--trainer.max_steps", "2",
             "--trainer.limit_val_batches", "0"], tmp_path)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert last.is_dir() and (last / "latest").is_file(), sorted(p.name for p in last.parent.iterdir())
