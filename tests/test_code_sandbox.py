"""Tests for :mod:`trustrl.rewards.code`: the sandbox and the unit-test reward.

Every hostile program here is run *inside* the sandbox with small limits, and each test
asserts the containment itself (canaries outside the sandbox, a listening socket, the process
table), not just the score. Expected scores are worked by hand in comments.

Containment of the fork bomb relies on RLIMIT_NPROC, which the kernel does not enforce for
root: the test only runs when the sandbox drops to an unprivileged uid (or we are not root).
"""

from __future__ import annotations

import ast
import os
import resource
import secrets
import shutil
import socket
import stat
import tempfile
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustrl.rewards import code as sandbox_mod
from trustrl.rewards.code import (
    code_tests_reward,
    extract_code,
    run_in_sandbox,
    sandbox_capabilities,
)

CAPS = sandbox_capabilities()
NPROC_ENFORCED = CAPS["uid_drop"] or os.geteuid() != 0
READONLY_FS = CAPS["filesystem"] == "readonly_mounts"

ADD_TESTS = (
    "import math\n"            # set-up statement: runs, not counted
    "assert add(1, 2) == 3\n"
    "assert add(0, 5) == 5\n"
    "assert add(2, 2) == 4\n"
    "assert add(3, 1) == 4\n"
)
GOOD = "Here is my solution:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
# a*b if a else b:  add(1,2)=2 (fail)  add(0,5)=5 (pass)  add(2,2)=4 (pass)  add(3,1)=3 (fail)
# -> 2 of 4 asserts pass -> 0.5
HALF = "```python\ndef add(a, b):\n    return a * b if a else b\n```"
SYNTAX_ERROR = "```python\ndef add(a, b)\n    return a + b\n```"


def _procs_of_uid(uid: int | None) -> list[tuple]:
    """Every process (zombies included) running as ``uid``."""
    if uid is None:
        return []
    return [row for row in sandbox_mod._proc_table() if row[1] == uid]


def _assert_cleaned_up(res) -> None:
    assert res.leftover_processes == 0
    assert _procs_of_uid(res.uid) == [], "sandbox processes (or zombies) outlived the run"


@pytest.fixture
def canary_dir():
    """A world-writable, non-sticky directory in /tmp with a world-writable file in it: only
    the sandbox's read-only mounts (not file permissions) protect these."""
    d = tempfile.mkdtemp(prefix="trustrl_canary_dir_")
    os.chmod(d, 0o777)
    f = os.path.join(d, "keep.txt")
    with open(f, "w") as fh:
        fh.write("precious")
    os.chmod(f, 0o666)
    yield d
    shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------------------------------
# basics


def test_capabilities_are_reported_and_consistent():
    assert set(CAPS) >= {"mode", "network", "netns_available", "uid_drop", "filesystem",
                         "pid_hiding", "process_cleanup"}
    assert CAPS["mode"] in ("root", "userns", "plain")
    assert CAPS["network"] == ("netns" if CAPS["netns_available"] else "socket_disabled")
    if CAPS["mode"] == "root":
        assert CAPS["uid_drop"] and READONLY_FS and CAPS["pid_hiding"]


def test_runs_code_with_stdin_scrubbed_env_and_removes_its_temp_dir(monkeypatch):
    made = []
    real_mkdtemp = tempfile.mkdtemp

    def spy(*a, **k):
        made.append(real_mkdtemp(*a, **k))
        return made[-1]

    monkeypatch.setattr(sandbox_mod.tempfile, "mkdtemp", spy)
    prog = (
        "import os, sys\n"
        "data = sys.stdin.read()\n"
        "print(data.upper(), end='')\n"
        "print(sorted(os.environ))\n"
        "open('scratch.txt', 'w').write('ok')\n"            # the work dir is writable
        "print(open('scratch.txt').read(), sys.flags.isolated, sys.flags.no_site)\n"
        "print(os.getuid())\n"
    )
    res = run_in_sandbox(prog, stdin="hello\n", wall_time_s=10)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "HELLO"
    assert lines[1] == "['HOME', 'LANG', 'PATH', 'TMPDIR']"
    assert lines[2] == "ok 1 1"
    if CAPS["uid_drop"]:
        assert int(lines[3]) == res.uid != 0
    assert res.killed_reason is None and not res.timed_out
    assert res.network_isolation == CAPS["network"]
    assert made and not any(os.path.exists(p) for p in made)
    _assert_cleaned_up(res)


def test_sandbox_sees_only_its_own_processes():
    if not CAPS["pid_hiding"]:
        pytest.skip("no pid namespace here")
    res = run_in_sandbox("import os\nprint(sorted(int(p) for p in os.listdir('/proc') "
                         "if p.isdigit()))", wall_time_s=10)
    assert res.returncode == 0, res.stderr
    # pid 1 (the sandbox's init) is root-owned and hidden by hidepid in root mode; at most
    # init and the program itself are visible - none of the host's ~100 processes.
    assert len(ast.literal_eval(res.stdout)) <= 2


# ------------------------------------------------------------------------------------------
# the reward on ordinary completions


def test_reward_correct_half_and_syntax_error():
    fn = code_tests_reward(timeout_s=10.0)
    scores = fn(["p"] * 4, [GOOD, HALF, SYNTAX_ERROR, "I don't know."], tests=[ADD_TESTS] * 4)
    # GOOD passes 4/4; HALF 2/4 (see above); a syntax error and prose (whole text is run as
    # code, itself a syntax error) score 0.
    assert scores == [1.0, 0.5, 0.0, 0.0]
    assert fn.__name__ == "code_tests"
    assert fn.last_isolation == CAPS


def test_reward_list_of_test_cases_and_chat_completions():
    fn = code_tests_reward(timeout_s=10.0)
    tests = ["assert sq(3) == 9", "assert sq(-2) == 4\nassert sq(0) == 0", "assert sq(1.5) == 2.25"]
    # sq = x*x but ints only via abs(x)*abs(x) when int, else 0:
    # sq(3)=9 pass; sq(-2)=4, sq(0)=0 pass (one multi-line case); sq(1.5)=0 fail -> 2/3
    partial = "```py\ndef sq(x):\n    return abs(x) * abs(x) if isinstance(x, int) else 0\n```"
    chat = [{"role": "assistant", "content": "```python\ndef sq(x):\n    return x * x\n```"}]
    scores = fn(["p", "p"], [partial, chat], tests=[tests, tests])
    assert scores[0] == pytest.approx(2 / 3)
    assert scores[1] == 1.0


def test_reward_bad_configuration_raises_with_names():
    with pytest.raises(ValueError, match="language"):
        code_tests_reward(language="rust")
    fn = code_tests_reward(tests_column="unit_tests")
    with pytest.raises(ValueError, match="unit_tests"):
        fn(["p"], [GOOD], tests=[ADD_TESTS])
    with pytest.raises(ValueError, match="row 1"):
        fn(["p", "p"], [GOOD, GOOD], unit_tests=[ADD_TESTS, 42])
    with pytest.raises(ValueError, match="row 0 .*not valid Python"):
        fn(["p"], [GOOD], unit_tests=["assert add(1, 2) =="])


def test_extract_code_rules():
    assert extract_code("a\n```python\nx = 1\n```\nb\n```python\ny = 2\n```") == "y = 2\n"
    assert extract_code("```\nz = 3\n```") == "z = 3\n"   # untagged block as fallback
    assert extract_code("```python\np = 1\n```\n```\nq = 2\n```") == "p = 1\n"  # tagged wins
    assert extract_code("print(1)") == "print(1)"
    assert extract_code([{"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "```py\nw = 0\n```"}]) == "w = 0\n"


@settings(max_examples=50, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters="`")))
def test_extract_code_property(body):
    assert extract_code(f"Sure.\n```python\n{body}\n```\nHope it helps.") == body + "\n"
    assert extract_code(body) == body  # no fence: the whole text


# ------------------------------------------------------------------------------------------
# hostile programs, each contained


def test_infinite_loop_hits_wall_time():
    t0 = time.monotonic()
    res = run_in_sandbox("while True:\n    pass", wall_time_s=1.0, cpu_time_s=30)
    elapsed = time.monotonic() - t0
    assert res.killed_reason == "wall_time" and res.timed_out
    assert res.returncode == -9
    assert elapsed < 1.0 + 2.0
    _assert_cleaned_up(res)
    # a sleeping program uses no CPU: only the wall clock catches it
    res = run_in_sandbox("import time\ntime.sleep(1000)", wall_time_s=1.0, cpu_time_s=30)
    assert res.killed_reason == "wall_time"
    _assert_cleaned_up(res)

    fn = code_tests_reward(timeout_s=1.0)
    t0 = time.monotonic()
    assert fn(["p"], ["```python\ndef add(a, b):\n    while True: pass\n```"],
              tests=[ADD_TESTS]) == [0.0]
    assert time.monotonic() - t0 < 1.0 + 2.0


def test_timeout_keeps_the_test_cases_passed_before_it():
    fn = code_tests_reward(timeout_s=1.0)
    tests = ["assert f(1) == 1", "assert f(2) == 2", "assert f(3) == 3", "assert f(4) == 4"]
    # f hangs on 3: cases 0 and 1 pass and are reported, case 2 never returns -> 2/4 = 0.5
    hang = "```python\ndef f(x):\n    while x == 3:\n        pass\n    return x\n```"
    assert fn(["p"], [hang], tests=[tests]) == [0.5]


def test_run_in_sandbox_rejects_bad_arguments():
    with pytest.raises(ValueError, match="network"):
        run_in_sandbox("pass", network="wifi")
    with pytest.raises(ValueError, match="wall_time_s"):
        run_in_sandbox("pass", wall_time_s=0)


def test_cpu_time_limit():
    res = run_in_sandbox("while True:\n    pass", wall_time_s=20.0, cpu_time_s=1.0)
    assert res.killed_reason == "cpu_time" and res.timed_out
    assert 0.9 <= res.cpu_seconds < 3.0
    assert res.wall_seconds < 10.0  # 1 s of CPU, even on a busy 2-core box
    _assert_cleaned_up(res)


@pytest.mark.skipif(not NPROC_ENFORCED, reason="RLIMIT_NPROC is not enforced for root and the "
                                               "sandbox could not drop to another uid")
def test_fork_bomb_is_bounded_and_leaves_nothing_behind():
    max_procs = 8
    peak = {"per_uid": 0, "total": 0}
    base_total = len(sandbox_mod._proc_table())
    stop = threading.Event()

    def monitor():
        while not stop.is_set():
            rows = sandbox_mod._proc_table()
            per_uid: dict[int, int] = {}
            for _, uid, _, _, state in rows:
                if sandbox_mod._UID_LOW <= uid < sandbox_mod._UID_HIGH and state not in "ZX":
                    per_uid[uid] = per_uid.get(uid, 0) + 1
            peak["per_uid"] = max([peak["per_uid"], *per_uid.values()])
            peak["total"] = max(peak["total"], len(rows))
            time.sleep(0.02)

    bomb = (
        "import os\n"
        "while True:\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            os.setsid()\n"       # try to leave the session, too
        "    except OSError:\n"
        "        pass\n"
    )
    watcher = threading.Thread(target=monitor, daemon=True)
    watcher.start()
    t0 = time.monotonic()
    try:
        res = run_in_sandbox(bomb, wall_time_s=1.5, cpu_time_s=10, max_processes=max_procs)
    finally:
        stop.set()
        watcher.join()
    assert time.monotonic() - t0 < 1.5 + 2.0
    assert res.killed_reason == "wall_time"
    if CAPS["uid_drop"]:
        assert 1 < peak["per_uid"] <= max_procs  # it did fork, and no more than the cap
    assert peak["total"] - base_total < 4 * max_procs  # the machine never saw a flood
    _assert_cleaned_up(res)
    assert not any(row[1] == res.uid for row in sandbox_mod._proc_table())


def test_huge_allocation_hits_memory_limit():
    res = run_in_sandbox("x = bytearray(10 * 1024 ** 3)\nprint('allocated')", memory_mb=256)
    assert res.killed_reason == "memory"
    assert res.returncode == 1 and "allocated" not in res.stdout
    assert "MemoryError" in res.stderr
    # growing step by step stops at the cap, too (and quickly)
    res = run_in_sandbox("chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))",
                         memory_mb=128, wall_time_s=10)
    assert res.killed_reason == "memory"
    assert res.wall_seconds < 5
    _assert_cleaned_up(res)


def test_parent_environment_secrets_do_not_leak(monkeypatch):
    secret = "sk-trustrl-" + secrets.token_hex(16)
    monkeypatch.setenv("TRUSTRL_FAKE_API_KEY", secret)
    prog = (
        "import os\n"
        "print(dict(os.environ))\n"
        "for pid in ['self', str(os.getppid()), '1'] + os.listdir('/proc'):\n"
        "    try:\n"
        "        print(pid, open(f'/proc/{pid}/environ', 'rb').read())\n"
        "    except Exception as e:\n"
        "        print(pid, 'denied', type(e).__name__)\n"
    )
    res = run_in_sandbox(prog, wall_time_s=10)
    assert res.returncode == 0, res.stderr
    assert secret not in res.stdout + res.stderr
    assert "TRUSTRL_FAKE_API_KEY" not in res.stdout + res.stderr
    assert os.environ["TRUSTRL_FAKE_API_KEY"] == secret  # the parent still has it


@pytest.mark.parametrize("network", ["auto", "socket_disabled"])
def test_cannot_connect_to_a_local_listening_socket(network):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    accepted = []
    stop = threading.Event()

    def accept_loop():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            accepted.append(conn)

    t = threading.Thread(target=accept_loop, daemon=True)
    t.start()
    prog = (
        "import socket\n"
        "try:\n"
        f"    s = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
        "    s.sendall(b'exfiltrated')\n"
        "    print('CONNECTED')\n"
        "except Exception as e:\n"
        "    print('FAILED', type(e).__name__, e)\n"
        "try:\n"
        "    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n"
        f"    s.connect(('127.0.0.1', {port}))\n"
        "    print('CONNECTED-RAW')\n"
        "except Exception as e:\n"
        "    print('FAILED-RAW', type(e).__name__)\n"
    )
    try:
        res = run_in_sandbox(prog, wall_time_s=10, network=network)
    finally:
        time.sleep(0.3)
        stop.set()
        t.join()
        for c in accepted:
            c.close()
        server.close()
    expected_kind = CAPS["network"] if network == "auto" else "socket_disabled"
    assert res.network_isolation == expected_kind
    assert "FAILED " in res.stdout and "FAILED-RAW" in res.stdout, res.stdout + res.stderr
    assert "CONNECTED" not in res.stdout
    assert accepted == []


@pytest.mark.skipif(not READONLY_FS, reason="no read-only mount namespace on this machine")
def test_cannot_write_outside_the_temp_dir(tmp_path, canary_dir):
    tag = secrets.token_hex(6)
    targets = [
        str(tmp_path / "outside.txt"),                   # pytest's tmp dir (root-only)
        f"/tmp/trustrl_canary_{tag}",                    # world-writable /tmp
        f"/dev/shm/trustrl_canary_{tag}",                # world-writable tmpfs
        os.path.join(canary_dir, f"new_{tag}.txt"),      # world-writable, non-sticky dir
    ]
    prog = (
        "import os\n"
        f"for path in {targets!r}:\n"
        "    try:\n"
        "        with open(path, 'w') as f:\n"
        "            f.write('pwned')\n"
        "        print('WROTE', path)\n"
        "    except OSError as e:\n"
        "        print('BLOCKED', path, e.errno)\n"
        f"for d in ['/tmp/trustrl_canary_mkdir_{tag}', os.path.expanduser('~') + '/../escape_{tag}']:\n"
        "    try:\n"
        "        os.makedirs(d)\n"
        "        print('MADE', d)\n"
        "    except OSError as e:\n"
        "        print('BLOCKED', d, e.errno)\n"
    )
    res = run_in_sandbox(prog, wall_time_s=10)
    assert res.returncode == 0, res.stderr
    assert "WROTE" not in res.stdout and "MADE" not in res.stdout, res.stdout
    assert res.stdout.count("BLOCKED") == len(targets) + 2
    for path in targets + [f"/tmp/trustrl_canary_mkdir_{tag}"]:
        assert not os.path.exists(path), path
    assert not [p for p in os.listdir("/tmp") if tag in p]
    assert os.listdir(canary_dir) == ["keep.txt"]


@pytest.mark.skipif(not READONLY_FS, reason="no read-only mount namespace on this machine")
def test_cannot_delete_or_modify_files_outside(tmp_path, canary_dir):
    private = tmp_path / "canary.txt"
    private.write_text("do not delete")
    shared = os.path.join(canary_dir, "keep.txt")   # mode 0666 in a 0777 dir
    before = {p: (os.stat(p).st_mtime_ns, stat.S_IMODE(os.stat(p).st_mode), open(p).read())
              for p in (str(private), shared)}
    prog = (
        "import os, shutil\n"
        f"for path in {[str(private), shared]!r}:\n"
        "    for name, act in [('remove', lambda: os.remove(path)),\n"
        "                      ('truncate', lambda: open(path, 'w').close()),\n"
        "                      ('append', lambda: open(path, 'a').write('x')),\n"
        "                      ('rename', lambda: os.rename(path, path + '.moved')),\n"
        "                      ('chmod', lambda: os.chmod(path, 0o000)),\n"
        "                      ('utime', lambda: os.utime(path, (0, 0)))]:\n"
        "        try:\n"
        "            act()\n"
        "            print('DID', name, path)\n"
        "        except OSError as e:\n"
        "            print('BLOCKED', name, e.errno)\n"
        f"shutil.rmtree({canary_dir!r}, ignore_errors=True)\n"
    )
    res = run_in_sandbox(prog, wall_time_s=10)
    assert res.returncode == 0, res.stderr
    assert "DID" not in res.stdout, res.stdout
    for p, (mtime, mode, text) in before.items():
        st_ = os.stat(p)
        assert (st_.st_mtime_ns, stat.S_IMODE(st_.st_mode), open(p).read()) == (mtime, mode, text)
    assert os.listdir(canary_dir) == ["keep.txt"]


def test_printing_a_gigabyte_is_capped_fast_and_bounded_in_memory():
    cap = 65536
    rss_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.monotonic()
    res = run_in_sandbox("import sys\nchunk = 'x' * (1 << 20)\n"
                         "for _ in range(1024):\n    sys.stdout.write(chunk)",   # 1 GiB
                         max_output_bytes=cap, wall_time_s=30)
    elapsed = time.monotonic() - t0
    assert res.killed_reason == "output_limit"
    assert res.stdout_truncated and len(res.stdout.encode()) == cap
    assert elapsed < 5.0
    # the same on stderr
    res2 = run_in_sandbox("import os\nwhile True:\n    os.write(2, b'e' * 65536)",
                          max_output_bytes=cap, wall_time_s=30)
    assert res2.killed_reason == "output_limit" and len(res2.stderr.encode()) == cap
    rss_after_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert rss_after_kb - rss_before_kb < 64 * 1024  # peak RSS grew < 64 MiB (of 1 GiB printed)
    _assert_cleaned_up(res)
    _assert_cleaned_up(res2)


def test_results_cannot_be_forged_or_tests_read():
    fn = code_tests_reward(timeout_s=10.0)
    forgers = [
        # fake result lines in every plausible shape
        "```python\nfor i in range(4):\n    print('0' * 32, i, 'pass')\n    print('PASS', i)\n"
        "def add(a, b):\n    return None\n```",
        # look for the tests: stdin is /dev/null by now, no file holds them, and the expected
        # values never enter the sandbox at all
        "```python\nimport os, sys\nleak = sys.stdin.read() + ''.join(open(f).read() for f in "
        "os.listdir('.') if os.path.isfile(f))\nfound = ('add(' + '1, 2)') in leak\n"
        "def add(a, b):\n    return a + b if found else None\n```",
        # exit before the tests run
        "```python\nimport os\ndef add(a, b):\n    return a + b\nos._exit(0)\n```",
        # quietly kill everything it can see
        "```python\nimport os\nfor p in range(1, 5000):\n    try: os.kill(p, 9)\n"
        "    except OSError: pass\ndef add(a, b):\n    return a + b\n```",
    ]
    assert fn(["p"] * 4, forgers, tests=[ADD_TESTS] * 4) == [0.0, 0.0, 0.0, 0.0]


def test_trainer_like_loop_survives_hostile_completions(tmp_path):
    tag = secrets.token_hex(6)
    canary = tmp_path / "canary.txt"
    canary.write_text("alive")
    hostile = {
        "infinite_loop": "```python\nwhile True:\n    pass\n```",
        "ten_gigabytes": "```python\nx = bytearray(10 * 1024 ** 3)\n```",
        "read_env": "```python\nimport os\nprint(os.environ)\ndef add(a, b): return None\n```",
        "socket": "```python\nimport socket\nsocket.create_connection(('127.0.0.1', 22), 1)\n```",
        "print_1gb": "```python\nimport sys\nfor _ in range(1024): sys.stdout.write('x' * (1 << 20))\n```",
        "syntax_error": SYNTAX_ERROR,
    }
    if READONLY_FS:
        hostile["write_outside"] = f"```python\nopen('/tmp/trustrl_canary_{tag}', 'w').write('x')\n```"
        hostile["delete"] = f"```python\nimport os\nos.remove({str(canary)!r})\n```"
    if NPROC_ENFORCED:
        hostile["fork_bomb"] = ("```python\nimport os\nwhile True:\n    try: os.fork()\n"
                                "    except OSError: pass\n```")
    batch = [GOOD, *hostile.values(), GOOD]
    expected = [1.0] + [0.0] * len(hostile) + [1.0]
    fn = code_tests_reward(timeout_s=1.5, memory_mb=256)
    t0 = time.monotonic()
    for step in range(2):
        scores = fn(["p"] * len(batch), batch, tests=[ADD_TESTS] * len(batch))
        assert scores == expected, dict(zip(["good", *hostile, "good"], scores))
    # 2 steps; per step at most 2 runs hit the 1.5 s wall (loop, fork bomb) on 2 workers
    assert time.monotonic() - t0 < 20
    assert canary.read_text() == "alive"
    assert not os.path.exists(f"/tmp/trustrl_canary_{tag}")
    if CAPS["uid_drop"]:
        live = [row for row in sandbox_mod._proc_table()
                if sandbox_mod._UID_LOW <= row[1] < sandbox_mod._UID_HIGH]
        assert live == [] or os.environ.get("PYTEST_XDIST_WORKER"), live


def test_through_the_reward_registry():
    from trustrl.rewards.registry import resolve_reward, score_completions

    reward = resolve_reward({"name": "code_tests", "kwargs": {"timeout_s": 5.0}})
    res = score_completions([reward], ["p", "p"], [GOOD, HALF],
                            {"tests": [ADD_TESTS, ADD_TESTS]}, timeout_s=60)
    assert res.total.tolist() == [1.0, 0.5]  # see GOOD / HALF at the top
