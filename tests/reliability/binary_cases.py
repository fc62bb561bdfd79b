"""Runs one binary's ``main`` under ``absl.app.run`` for many argument lists in one process.

  python -m tests.reliability.binary_cases MODULE CASES_JSON OUT_JSON

CASES_JSON holds a list of argument lists; OUT_JSON receives, for each, ``{"code": exit status,
"stderr": what it wrote to stderr}`` exactly as a separate ``python -m MODULE ARGS...`` would
end (``app.run`` re-parses flags on every call; a ``SystemExit`` message goes to stderr with
status 1, as the interpreter does). One process per binary keeps the table cheap.
"""

import contextlib
import importlib
import io
import json
import sys

from absl import app
from absl import flags
from absl import logging


def run_case(module, name: str, args: list[str]) -> dict:
  # The config flag registers its --config.* override flags from sys.argv when it parses the
  # config file: give it this case's argv, a config file to parse, and no stale overrides.
  flags.FLAGS.unparse_flags()
  for flag in [f for f in flags.FLAGS if f.startswith("config.")]:
    delattr(flags.FLAGS, flag)
  if "config" in flags.FLAGS and not any(a.startswith("--config=") for a in args):
    args = [f"--config={flags.FLAGS['config'].default_as_str.strip(chr(39))}", *args]
  sys.argv = [name, *args]
  stderr = io.StringIO()
  code = 0
  with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
    try:
      app.run(module.main, argv=sys.argv)
    except SystemExit as e:
      if isinstance(e.code, str):
        stderr.write(e.code + "\n")
        code = 1
      else:
        code = 0 if e.code is None else int(e.code)
  return {"code": code, "stderr": stderr.getvalue()}


def main(name: str, cases_json: str, out_json: str) -> None:
  logging.set_stderrthreshold("fatal")  # Log lines are not the binaries' error messages.
  module = importlib.import_module(name)
  with open(cases_json) as f:
    cases = json.load(f)
  results = [run_case(module, name, args) for args in cases]
  with open(out_json, "w") as f:
    json.dump(results, f)


if __name__ == "__main__":
  main(*sys.argv[1:])
