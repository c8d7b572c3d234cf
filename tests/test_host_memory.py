"""reparam.train.use_huge_pages / huge_pages_env: glibc's malloc on transparent huge pages, by re-execution."""
import os
import platform
import subprocess
import sys

import reparam as rp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _applies() -> bool:
    """Whether use_huge_pages acts on this machine: Linux, glibc and transparent huge pages not ``never``."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def _run(args):
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_huge_pages_env_adds_the_tunable_once_and_keeps_the_others():
    env = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0:glibc.malloc.arena_max=2", "OTHER": "1"}
    out = rp.train.huge_pages_env(env)
    assert out["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert out["OTHER"] == "1" and env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0:glibc.malloc.arena_max=2"
    assert rp.train.huge_pages_env({})["GLIBC_TUNABLES"] == rp.train.HUGE_PAGES
    assert rp.train.huge_pages_env(out) == out                     # idempotent


def test_use_huge_pages_reexecutes_a_script_once_with_its_arguments(tmp_path):
    script = tmp_path / "script.py"
    script.write_text("import os, sys\nprint('start', flush=True)\nimport reparam as rp\n"
                      "print('result', rp.train.use_huge_pages(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])\n")
    proc = _run([str(script), "--flag=a b"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    if _applies():
        assert proc.stdout.count("start") == 2, proc.stdout          # the re-executed run starts over
        assert f"result True {rp.train.HUGE_PAGES} ['--flag=a b']" in proc.stdout, proc.stdout
    else:
        assert proc.stdout.count("start") == 1 and "result False None" in proc.stdout, proc.stdout


def test_use_huge_pages_does_not_reexecute_python_c_and_says_how():
    proc = _run(["-c", "import reparam as rp; print('result', rp.train.use_huge_pages())"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "result False" in proc.stdout
    if _applies():
        assert "GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in proc.stderr, proc.stderr
