"""config.profile: a trace of exactly the requested steps in the workdir's TensorBoard directory."""

import glob
import os

import jax
import pytest

from tests.train.conftest import PROFILED_STEPS
from tests.train.synthetic import tiny_config
from yocou_jax.config import ConfigError
from yocou_jax import profiling
from yocou_jax.train import trainer


def traced_steps(xplane_path: str) -> list[int]:
  """The step numbers of the training-step annotations in an xprof trace."""
  profile = jax.profiler.ProfileData.from_file(xplane_path)
  return sorted(int(dict(event.stats)["step_num"])
                for plane in profile.planes for line in plane.lines for event in line.events
                if event.name == profiling.TRACE_NAME)


def test_trace_holds_exactly_the_requested_steps(tooling_run):
  traces = glob.glob(os.path.join(tooling_run.workdir, "tensorboard", "plugins", "profile", "*",
                                  "*.xplane.pb"))
  assert len(traces) == 1  # One trace, from process 0.
  first, last = profiling.parse_steps(PROFILED_STEPS)
  assert traced_steps(traces[0]) == list(range(first, last + 1))
  # The Chrome-trace copy Perfetto opens sits beside it.
  assert glob.glob(os.path.join(os.path.dirname(traces[0]), "*.trace.json.gz"))


def test_run_resumed_inside_the_range_traces_its_remaining_steps(tmp_path):
  """A run resumed after step 3 of a 3..5 range traces 4 and 5; one past the range, nothing."""
  step = jax.jit(lambda x, batch: (x + batch, {}))
  x = jax.numpy.ones(4)
  inside = profiling.StepProfiler(3, 5, str(tmp_path / "inside"))
  traced_step = inside.wrap(step, first_step=4)
  for _ in range(4, 8):
    x, _ = traced_step(x, 1.0)
  inside.close()
  after = profiling.StepProfiler(3, 5, str(tmp_path / "after"))
  after.wrap(step, first_step=6)(x, 1.0)
  after.close()
  assert float(x[0]) == 5.0  # The wrapped step still runs every update.
  [trace] = glob.glob(str(tmp_path / "inside" / "plugins" / "profile" / "*" / "*.xplane.pb"))
  assert traced_steps(trace) == [4, 5]
  assert not (tmp_path / "after").exists()


@pytest.mark.parametrize("steps, message", [
    ("15,10", "'15,10' is invalid"),
    ("0,3", "'0,3' is invalid"),
    ("10", "'10' is invalid"),
    ("a,b", "'a,b' is invalid"),
    ("1,2,3", "'1,2,3' is invalid"),
    ("10,25", "STOP=25 is after the last step (config.train.steps=20)"),
])
def test_bad_profile_range_is_one_line_naming_the_field(steps, message):
  config = tiny_config()
  config.profile.steps = steps
  with pytest.raises(ConfigError, match=r"config\.profile\.steps=.*" + message.replace(
      "(", r"\(").replace(")", r"\)")) as info:
    trainer.validate_config(config, 1, 1)
  assert "\n" not in str(info.value)


def test_profile_off_builds_no_profiler():
  config = tiny_config()
  assert config.profile.steps == ""
  assert profiling.from_config(config.profile, "unused", process_index=0) is None
  config.profile.steps = "2,3"
  assert profiling.from_config(config.profile, "unused", process_index=1) is None
  config.profile.all_processes = True
  assert profiling.from_config(config.profile, "unused", process_index=1) is not None
