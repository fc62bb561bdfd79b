"""Loading checkpoints, exports, tokenizers and data never runs code from the files it reads.

The scan walks the syntax tree of every module of the package and the binaries, and fails on
pickle-family modules, ``eval``/``exec``/``compile`` of strings, ``torch.load`` without
``weights_only=True``, ``numpy.load(..., allow_pickle=True)`` and ``yaml.load`` without a safe
loader.
"""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCANNED = ("yocou_jax", "experiments", "kernels")
CODE_LOADING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve",
                        "joblib"}
CODE_RUNNING_BUILTINS = {"eval", "exec", "compile", "__import__"}


def _keyword(call: ast.Call, name: str):
  for kw in call.keywords:
    if kw.arg == name:
      return kw.value
  return None


def _is_true(node) -> bool:
  return isinstance(node, ast.Constant) and node.value is True


def _dotted(node) -> str:
  if isinstance(node, ast.Attribute):
    return f"{_dotted(node.value)}.{node.attr}"
  return node.id if isinstance(node, ast.Name) else ""


def violations(source: str, filename: str = "<source>") -> list[str]:
  """Every place in ``source`` that could run code from data it loads."""
  found = []
  for node in ast.walk(ast.parse(source, filename)):
    where = f"{filename}:{getattr(node, 'lineno', 0)}"
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
      for name in names:
        if name.split(".")[0] in CODE_LOADING_MODULES:
          found.append(f"{where}: imports {name}")
    elif isinstance(node, ast.Call):
      name = _dotted(node.func)
      if name in CODE_RUNNING_BUILTINS:
        found.append(f"{where}: calls {name}()")
      elif name.endswith("torch.load"):
        if not _is_true(_keyword(node, "weights_only")):
          found.append(f"{where}: torch.load without weights_only=True")
      elif name in ("np.load", "numpy.load", "jnp.load") and _is_true(
          _keyword(node, "allow_pickle")):
        found.append(f"{where}: {name}(allow_pickle=True)")
      elif name == "yaml.load" and "Safe" not in ast.unparse(_keyword(node, "Loader") or
                                                             ast.Constant("")):
        found.append(f"{where}: yaml.load without a safe Loader")
  return found


def package_files() -> list[str]:
  files = []
  for top in SCANNED:
    for root, _, names in os.walk(os.path.join(REPO, top)):
      files += [os.path.join(root, n) for n in names if n.endswith(".py")]
  return sorted(files)


def test_no_load_path_runs_code():
  files = package_files()
  assert len(files) > 30  # The whole package was found.
  found = []
  for path in files:
    with open(path, encoding="utf-8") as f:
      found += violations(f.read(), os.path.relpath(path, REPO))
  assert not found, "\n".join(found)


@pytest.mark.parametrize("snippet, what", [
    ("import pickle\n", "imports pickle"),
    ("from cloudpickle import loads\n", "imports cloudpickle"),
    ("x = eval(text)\n", "calls eval()"),
    ("exec(code)\n", "calls exec()"),
    ("import torch\nsd = torch.load(path)\n", "torch.load without weights_only=True"),
    ("sd = torch.load(path, weights_only=False)\n", "torch.load without weights_only=True"),
    ("a = np.load(path, allow_pickle=True)\n", "np.load(allow_pickle=True)"),
    ("cfg = yaml.load(f)\n", "yaml.load without a safe Loader"),
])
def test_the_scan_finds_each_kind(snippet, what):
  assert [v.split(": ", 1)[1] for v in violations(snippet)] == [what]


def test_the_scan_accepts_safe_loading():
  assert violations("sd = torch.load(p, weights_only=True)\na = np.load(p)\n"
                    "c = yaml.load(f, Loader=yaml.SafeLoader)\nimport json\njson.loads(s)\n") == []
