"""Keeps the CPU engines (OpenVINO, ONNX Runtime) out of the pytest workers: tests marked ``engines`` run
in a forked child of the worker, and everywhere else in-process inference is torch (``engine: auto``
finds no CPU engine). The hook and fixture are re-exported by conftest.py.

OpenVINO compiled beside torch in a long-lived xdist worker made later subprocess and DataLoader-worker
starts in that worker segfault, minutes and many tests later (docs/inference.md). The child runs the
whole test protocol (setup, call, teardown) and exits; the worker only reads its reports. Subprocess runs
of predict.py are separate processes and still take OpenVINO. (pytest-forked forks too, but fails every
test on pytest 9.)
"""

from __future__ import annotations

import json
import os

import pytest
from _pytest.runner import runtestprotocol

from pancreas_mtl.inference import engines, model_folder

MARKER = "engines"
IMPORT_ENGINE = engines.import_engine
USERS = (engines, model_folder)  # the modules that call import_engine


_in_forked_child = False


def _no_cpu_engine(engine: str):
    if _in_forked_child:
        return IMPORT_ENGINE(engine)
    raise ImportError(f"{engine} is kept out of the pytest worker (tests/forked.py); mark the test engines")


@pytest.fixture(autouse=True, scope="session")
def cpu_engines_kept_out_of_the_worker():
    """``import_engine`` fails in the worker for the whole session (module and session fixtures that
    predict included), and works in the forked child of an ``engines`` test."""
    with pytest.MonkeyPatch.context() as patch:
        for module in USERS:
            patch.setattr(module, "import_engine", _no_cpu_engine)
        yield


def _child(item, write_fd: int) -> None:
    """In the child: run the test, send its serialised reports, and leave without any cleanup of the
    parent's (os._exit: no atexit handlers, no flush of buffers the parent owns)."""
    global _in_forked_child
    status = 1
    try:
        _in_forked_child = True
        reports = runtestprotocol(item, log=False, nextitem=None)
        hook = item.config.hook
        payload = [hook.pytest_report_to_serializable(config=item.config, report=report) for report in reports]
        with os.fdopen(write_fd, "w") as pipe:
            json.dump(payload, pipe)
        status = 0
    finally:
        os._exit(status)


def _crash_report(item, status: int) -> pytest.TestReport:
    call = pytest.CallInfo.from_call(lambda: pytest.fail(f"the forked test process ended with status {status} "
                                                         "before reporting", pytrace=False), when="call")
    return pytest.TestReport.from_item_and_call(item, call)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    if item.get_closest_marker(MARKER) is None:
        return None
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _child(item, write_fd)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        text = pipe.read()
    _, wait_status = os.waitpid(pid, 0)
    status = os.waitstatus_to_exitcode(wait_status)
    if status == 0 and text:
        reports = [item.config.hook.pytest_report_from_serializable(config=item.config, data=data)
                   for data in json.loads(text)]
    else:
        reports = [_crash_report(item, status)]
    for report in reports:
        item.ihook.pytest_runtest_logreport(report=report)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True
