"""A pytest plugin for bench/report.py: one JSON line per test the moment it ends, and work sharing.

    python -m pytest -p bench.record --record-to PATH [--share-dir DIR] ...

--record-to PATH appends one JSON object a line to PATH, each written (and closed) as soon as it is
known, so a process killed at any moment leaves every result it had:
  {"event": "collected", "n": N}                 the tests this process selected
  {"event": "start", "nodeid": ID}               a test began (the last one without an outcome is
                                                 the one that was running when the process died)
  {"event": "outcome", "nodeid": ID, "outcome": "passed" | "failed" | "skipped" | "error" |
   "xfailed" | "xpassed", "seconds": S, "message": TEXT, "extra_info": {...}, "collecting": true}
  {"event": "stopped", "why": TEXT}              this process stopped early (below)
extra_info is a benchmark's benchmark.extra_info (pytest-benchmark), present when the test used the
fixture and set it; message is the skip reason or the failure's one-line crash message. A module
that fails to import is an "error" outcome under the module's node id, marked "collecting" (it is
not one of the N collected).

Two things for a first run on a GPU, where a kernel may crash or hang:
- A failure with a sticky CUDA error (an illegal memory access, a device-side assert, ...) leaves
  the process's CUDA context broken, so every later test in it would fail too: the process stops
  there, and (with --share-dir) the other processes take the tests it had not claimed yet.
- On SIGUSR1 (bench/report.py sends it just before it ends a process at its limit) the Python
  stacks of every thread go to PATH.stacks: where it hung. (Not on SIGTERM: code under test, such
  as train.py's interrupt handling, installs SIGTERM handlers of its own.)

--share-dir DIR shares one test list among several pytest processes started side by side with the
same arguments (no pytest-xdist needed): each process collects every test, and the tests, in groups
of consecutive ones from the same test function, go to whichever process claims a group first (an
exclusive create of a file named after the group in DIR). A slow group keeps one process busy while
the others take the rest, so the processes finish together whatever each test costs, and tests that
compile the same kernel variants mostly run in the same process.

Only the standard library and pytest: importing this must not import torch or triton (the tests'
conftest.py decides how triton is set up before it is first imported).
"""

from __future__ import annotations

import faulthandler
import hashlib
import json
import os
import re
import signal

import pytest

GROUP_SIZE = 4  # consecutive tests of one test function claimed together
# Errors after which a CUDA context is unusable: every later kernel launch in the process fails.
STICKY_CUDA_ERROR = re.compile(r"illegal memory access|unspecified launch failure|misaligned address|"
                               r"illegal instruction|device-side assert|uncorrectable ECC")


def pytest_addoption(parser):
    group = parser.getgroup("record", "per-test records for bench/report.py")
    group.addoption("--record-to", metavar="PATH", default=None,
                    help="append one JSON line per test start and outcome to PATH")
    group.addoption("--share-dir", metavar="DIR", default=None,
                    help="share the tests with other pytest processes given the same DIR")


def pytest_configure(config):
    if config.getoption("record_to"):
        config.pluginmanager.register(Recorder(config.getoption("record_to")), "bench-record")


def _message(report) -> str:
    """The skip reason, the xfail reason, or the first line of the failure's crash message."""
    if hasattr(report, "wasxfail"):
        return report.wasxfail or "xfail"
    longrepr = report.longrepr
    if report.skipped and isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    crash = getattr(longrepr, "reprcrash", None)
    text = (crash.message if crash is not None else str(longrepr or "")).strip()
    return text.splitlines()[0][:300] if text else ""


class Recorder:
    """The hooks that write the record (registered only with --record-to)."""

    def __init__(self, path: str):
        self.path = path
        if hasattr(signal, "SIGUSR1"):
            # Open for the process's life: faulthandler writes to it from its signal handler.
            self.stacks = open(path + ".stacks", "w")
            faulthandler.register(signal.SIGUSR1, file=self.stacks, all_threads=True)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")

    def pytest_collectreport(self, report):
        if report.failed:  # a module that does not import: its tests never run
            lines = [ln.strip() for ln in str(report.longrepr).splitlines() if ln.strip()]
            self.write({"event": "outcome", "nodeid": report.nodeid, "outcome": "error", "seconds": 0.0,
                        "message": (lines[-1] if lines else "")[:300], "collecting": True})

    def pytest_collection_finish(self, session):
        self.write({"event": "collected", "n": len(session.items)})

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        self.write({"event": "start", "nodeid": item.nodeid})
        yield

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        report = outcome.get_result()
        # One outcome per test: the call's, or the setup's when setup failed or skipped, or an error
        # in teardown after a passing call.
        if not (report.when == "call" or (report.when == "setup" and not report.passed)
                or (report.when == "teardown" and report.failed)):
            return
        if hasattr(report, "wasxfail"):
            result = "xfailed" if report.skipped else "xpassed"
        elif report.when != "call" and report.failed:
            result = "error"
        else:
            result = report.outcome
        message = "" if report.passed else _message(report)
        record = {"event": "outcome", "nodeid": item.nodeid, "outcome": result,
                  "seconds": round(report.duration, 3), "message": message}
        extra = getattr(getattr(item, "funcargs", {}).get("benchmark"), "extra_info", None)
        if report.when == "call" and extra:
            record["extra_info"] = {"name": item.name, **extra}
        self.write(record)
        if report.failed and STICKY_CUDA_ERROR.search(str(report.longrepr)):
            why = f"a sticky CUDA error in {item.nodeid}: this process's CUDA context is broken"
            item.session.shouldstop = why
            self.write({"event": "stopped", "why": why})


def _groups(items):
    """Consecutive items of one test function, at most GROUP_SIZE a group: [(key, [items])]."""
    groups = []
    for item in items:
        owner = (item.nodeid.split("::")[0], getattr(item, "originalname", item.name))
        if groups and groups[-1][0] == owner and len(groups[-1][1]) < GROUP_SIZE:
            groups[-1][1].append(item)
        else:
            groups.append((owner, [item]))
    # A group is named by its first test: every process collects the same tests, so the same names.
    return [(hashlib.sha1(members[0].nodeid.encode()).hexdigest()[:20], members) for _, members in groups]


def _claimed(items, share_dir):
    """The items of each group this process wins, in order, claiming a group only when it is needed."""
    for name, members in _groups(items):
        try:
            os.close(os.open(os.path.join(share_dir, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        yield from members


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session):
    """pytest's own loop over the items this process claims (it needs the next item before the
    current one runs, to tear fixtures down at the right scope)."""
    share_dir = session.config.getoption("share_dir")
    if share_dir is None or session.config.option.collectonly:
        return None  # pytest's own loop
    if session.testsfailed and not session.config.option.continue_on_collection_errors:
        raise session.Interrupted(f"{session.testsfailed} errors during collection")
    os.makedirs(share_dir, exist_ok=True)
    mine = _claimed(session.items, share_dir)
    item = next(mine, None)
    while item is not None:
        nextitem = next(mine, None)
        item.config.hook.pytest_runtest_protocol(item=item, nextitem=nextitem)
        if session.shouldfail:
            raise session.Failed(session.shouldfail)
        if session.shouldstop:
            raise session.Interrupted(session.shouldstop)
        item = nextitem
    return True


def read_records(path, offset: int = 0):
    """The complete JSON lines of a record file from byte offset on: (records, new offset).

    A line still being written (no newline yet) is left for the next read."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    records = []
    for line in data[:end].splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            records.append({"event": "unreadable", "text": line[:200].decode(errors="replace")})
    return records, offset + end
