"""The sweep runner on a 2-point micro sweep: directories, sweep.json, skip, resume, commands."""

import json
import os
import subprocess
import sys

import pytest

from tests import cpu_env
from tests.train.test_train_binary import write_corpus
from yocou_jax.config import ConfigError
from yocou_jax.scaling import sweeps

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 6

SWEEP_FILE = '''
from yocou_jax.scaling import sweeps

COMMON = {{
    "model.num_layers": 2, "model.d_model": 32, "model.num_heads": 2, "model.num_kv_heads": 1,
    "model.head_dim": 16, "model.d_ff": 64, "model.window": 8, "data.seq_len": 32,
    "train.steps": {steps}, "train.batch_size": 4, "train.warmup_steps": 2,
    "eval.every_steps": 3, "eval.num_batches": 1, "eval.batch_size": 4,
    "checkpoint.every_steps": 3, "logging.every_steps": 3, "logging.tensorboard": False,
    "data.tfds_name": "text_files", "data.shuffle_window": 256,
    "data.text_glob": {corpus!r}, "data.tfds_data_dir": {tfds!r},
}}


def get_sweep():
  points = sweeps.grid(archs=["yocou"], rungs={{"r0": {{}}}}, iterations=[2],
                       budgets={{"lr1": {{"train.learning_rate": {lr!r}}},
                                "lr2": {{"train.learning_rate": 3e-3}}}}, common=COMMON)
  return sweeps.Sweep(name="micro", config={config!r}, points=points)
'''


def write_sweep(tmp_path, lr=1e-2) -> str:
  path = tmp_path / "micro.py"
  path.write_text(SWEEP_FILE.format(
      steps=STEPS, corpus=write_corpus(tmp_path / "corpus"), tfds=str(tmp_path / "tfds"), lr=lr,
      config=os.path.join(REPO, "experiments/configs/default.py")), encoding="utf-8")
  return str(path)


def run_shell(line: str, env) -> subprocess.CompletedProcess:
  env = dict(env, PATH=f"{os.path.dirname(sys.executable)}:{env['PATH']}")
  return subprocess.run(["bash", "-c", line], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)


def steps_logged(point_dir) -> list[int]:
  with open(os.path.join(point_dir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line)["step"] for line in f]


def test_micro_sweep_commands_skip_resume_and_refusal(tmp_path):
  sweep_file, workdir = write_sweep(tmp_path), str(tmp_path / "sweep")
  env = cpu_env.subprocess_env(1)
  printed = cpu_env.run_module("experiments.sweep", f"--sweep={sweep_file}",
                               f"--workdir={workdir}", "--print_commands")
  assert printed.returncode == 0, printed.stderr[-3000:]
  lines = printed.stdout.strip().splitlines()
  sweep = sweeps.load_sweep(sweep_file)
  assert [p.name for p in sweep.points] == ["yocou_r0_T2_lr1", "yocou_r0_T2_lr2"]
  assert lines == [sweeps.format_command(sweeps.train_command(sweep, p, workdir))
                   for p in sweep.points]

  # The first point's line runs as printed (a cluster job would); the second stops at step 3,
  # standing in for an interrupted run.
  first, second = (os.path.join(workdir, p.name) for p in sweep.points)
  done = run_shell(lines[0], env)
  assert done.returncode == 0, done.stderr[-3000:]
  assert steps_logged(first)[-1] == STEPS
  cut = run_shell(lines[1] + " --config.train.steps=3", env)
  assert cut.returncode == 0, cut.stderr[-3000:]
  assert steps_logged(second)[-1] == 3

  log = []
  runner = sweeps.Runner(sweep, workdir, env=env, log=log.append)
  assert runner.run(sweep.points, parallel=2) == {p.name: "done" for p in sweep.points}
  assert steps_logged(first)[-1] == STEPS and steps_logged(first).count(STEPS) == 1
  assert steps_logged(second)[-1] == STEPS
  with open(os.path.join(second, "train.log"), encoding="utf-8") as f:
    train_log = f.read()
  # The runner ran the printed command (with its own interpreter for "python").
  assert train_log.startswith(f"$ {sys.executable} {lines[1].split(' ', 1)[1]}\n")
  assert "resumed from step 3" in train_log
  with open(os.path.join(workdir, sweeps.SWEEP_JSON), encoding="utf-8") as f:
    recorded = json.load(f)
  assert [p["status"] for p in recorded["points"]] == ["done", "done"]
  assert recorded["points"][0]["plan"]["steps"] == STEPS
  for point_dir in (first, second):
    assert os.path.exists(os.path.join(point_dir, sweeps.DONE))

  # Finished points are skipped: no child process, nothing appended.
  log.clear()
  assert runner.run(sweep.points) == {p.name: "done" for p in sweep.points}
  assert log == [f"[skip] {p.name}: done" for p in sweep.points]
  assert steps_logged(second).count(STEPS) == 1

  # The same directory under a changed definition is refused, naming the point.
  changed = sweeps.load_sweep(write_sweep(tmp_path, lr=2e-2))
  with pytest.raises(ConfigError, match="point 'yocou_r0_T2_lr1' in .* was made by another"):
    sweeps.Runner(changed, workdir, env=env).run(changed.points)


def test_list_plans_budgets_and_bad_names(tmp_path):
  sweep = sweeps.Sweep("s", os.path.join(REPO, "experiments/configs/default.py"), [
      sweeps.Point("a", {"model.arch": "yoco", "train.flops_budget": 1e12}),
      sweeps.Point("b", {"model.arch": "yocou", "train.flops_budget": 1e12})])
  plans = [sweeps.plan_point(sweep, p) for p in sweep.points]
  assert plans[0]["steps_decided_by"] == "flops_budget"
  assert plans[1]["tokens"] < plans[0]["tokens"]  # Equal FLOPs: fewer tokens for yocou.
  assert all(p["flops"] <= 1e12 for p in plans)
  with pytest.raises(ConfigError, match=r"--only names unknown points \['c'\]"):
    sweeps.select(sweep, ["c"])
  bad = sweeps.Sweep("s", sweep.config, [sweeps.Point("x", {"train.nope": 1})])
  with pytest.raises(ConfigError, match="unknown config field 'train.nope'"):
    sweeps.plan_point(bad, bad.points[0])
  listed = cpu_env.run_module("experiments.sweep",
                              f"--sweep={os.path.join(REPO, 'experiments/configs/sweeps/scaling_paper.py')}",
                              "--list")
  assert listed.returncode == 0, listed.stderr[-3000:]
  assert "yocou_s8_T3_S20k" in listed.stdout and "20000" in listed.stdout
