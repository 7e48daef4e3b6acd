"""The repository's top-level folders never shadow the PyPI packages ``kernels`` and ``distributed``.

``python -m pytest`` and ``python -c`` put the working directory first on ``sys.path``. Started in
the repository root, ``import kernels`` must still find Hugging Face's ``kernels`` (which
transformers imports when it loads a model) and ``import distributed`` dask's ``distributed``,
and both must work in the same process as minbert. Each case starts Python the way a user does,
from the repository root, in a subprocess.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FOLDERS = [ROOT / "kernels", ROOT / "distributed"]


def _in_project(place):
    """True when `place` is one of this repository's top-level folders or a file in them."""
    place = Path(place).resolve()
    return any(place == folder or place.is_relative_to(folder) for folder in PROJECT_FOLDERS)

# Run in the child: load a transformers BERT (which imports `kernels`), use minbert beside it, and
# report where `kernels` and `distributed` resolve and whether the installed packages work.
PROBE = textwrap.dedent('''
    import importlib.metadata, importlib.util, json, os, sys

    import torch
    import transformers

    sizes = dict(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                 max_position_embeddings=16)
    hf = transformers.BertModel(transformers.BertConfig(**sizes)).eval()
    ids = torch.tensor([[2, 7, 9, 3]])
    with torch.no_grad():
        ref = hf(input_ids=ids).last_hidden_state

    import minbert
    from minbert.kernels.attention import attention
    import minbert.distributed.config
    mb = minbert.BertModel(minbert.BertConfig(**sizes)).eval()
    mb.load_state_dict(hf.state_dict(), strict=False)
    with torch.no_grad():
        ours = mb(input_ids=ids).last_hidden_state

    report = {"minbert_matches_transformers": bool(torch.allclose(ours, ref, atol=1e-5)), "names": {}}
    for name in ("kernels", "distributed"):
        spec = importlib.util.find_spec(name)
        try:
            dist = importlib.metadata.distribution(name)
            installed_at = str(dist.locate_file(""))
        except importlib.metadata.PackageNotFoundError:
            installed_at = None
        places = [] if spec is None else list(spec.submodule_search_locations or []) + [spec.origin or ""]
        entry = {"places": [os.path.abspath(p) for p in places if p], "installed_at": installed_at}
        if spec is not None and installed_at:
            module = __import__(name)
            if name == "kernels":
                from kernels import CUDAProperties  # what transformers' hub integration imports
                entry["works"] = CUDAProperties.__module__.startswith("kernels")
            else:
                from distributed import Client
                with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
                    entry["works"] = client.submit(lambda x: x + 1, 41).result() == 42
        report["names"][name] = entry
    print("REPORT" + json.dumps(report))
''')


def _run(argv, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    env["HOME"] = str(tmp_path)  # no user config of dask or the hub leaks in
    out = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{' '.join(argv[:2])} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("REPORT")]
    assert line, f"no report from {' '.join(argv[:2])}:\n{out.stdout[-3000:]}"
    return json.loads(line[-1][len("REPORT"):])


def _check(report):
    assert report["minbert_matches_transformers"]
    for name, entry in report["names"].items():
        inside = [p for p in entry["places"] if _in_project(p)]
        assert not inside, f"`import {name}` resolves to this repository: {inside}"
        if entry["places"]:  # present: it must be the installed distribution, and work
            assert entry["installed_at"], f"`import {name}` resolves to {entry['places']}, not an installed package"
            assert entry.get("works"), f"the installed `{name}` does not work beside minbert"


def test_python_c_from_the_repository_root(tmp_path):
    _check(_run([sys.executable, "-c", PROBE], tmp_path))


def test_python_m_pytest_from_the_repository_root(tmp_path):
    test_file = tmp_path / "test_probe.py"
    test_file.write_text("def test_probe():\n" + textwrap.indent(PROBE, "    "))
    report = _run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                   str(test_file)], tmp_path)
    _check(report)


@pytest.mark.parametrize("name", ["kernels", "distributed"])
def test_python_c_imports_the_installed_package(name, tmp_path):
    """`python -c "import transformers, kernels"` (and `distributed`) from the root, as a user types it."""
    code = (f"import importlib.util, os, transformers, {name}; s = importlib.util.find_spec('{name}'); "
            "print('REPORT' + __import__('json').dumps([os.path.abspath(p) for p in "
            "list(s.submodule_search_locations or []) + [s.origin or '']  if p]))")
    places = _run([sys.executable, "-c", code], tmp_path)
    assert places and not any(_in_project(p) for p in places), places
