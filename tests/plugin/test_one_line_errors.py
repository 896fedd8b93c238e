"""The one-line report of an uncaught DamError (plugin/one_line_errors.py), in a fresh process."""

import subprocess
import sys


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_a_dam_error_is_one_line_and_exit_1_once_installed():
    result = run("from mergekit_dam.plugin.one_line_errors import install_error_hook\n"
                 "from mergekit_dam.core.errors import DamError\n"
                 "install_error_hook(); install_error_hook()\n"
                 "raise DamError('dam: the problem; the fix')")
    assert result.returncode == 1 and result.stderr == "mergekit-dam error: dam: the problem; the fix\n"


def test_other_errors_keep_their_traceback():
    result = run("from mergekit_dam.plugin.one_line_errors import install_error_hook\n"
                 "install_error_hook()\n"
                 "raise KeyError('mine')")
    assert result.returncode == 1 and "Traceback" in result.stderr and "KeyError: 'mine'" in result.stderr
