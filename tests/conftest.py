import json
import os
import select
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "configs", "tiny.yaml")
sys.path.insert(0, os.path.join(ROOT, "tests"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Without a GPU, the Triton kernels (longctx/kernels/) run in Triton's interpreter.
# It must be chosen before Triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def load_script(path: str):
    """The script at ROOT/PATH.py as a module (scripts/ and tools/ are not packages)."""
    import importlib.util

    name = os.path.basename(path)
    spec = importlib.util.spec_from_file_location(name, f"{ROOT}/{path}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compiled_targets(fn, *args):
    """fn(*args) under torch.compile, the graph run eagerly through AOTAutograd (fake tensors and
    the custom ops' backward registrations), and the call_function targets of Dynamo's graph and
    of its submodules (checkpointed regions): (output, targets). Asserts one graph, no break."""
    from functorch.compile import make_boxed_compiler
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_autograd(fw_compiler=make_boxed_compiler(lambda g, _: g))(gm, example_inputs)
    out = torch.compile(fn, backend=backend)(*args)
    assert len(graphs) == 1, f"{len(graphs)} graphs: the model broke"
    targets = [n.target for m in graphs[0].modules() if isinstance(m, torch.fx.GraphModule)
               for n in m.graph.nodes if n.op == "call_function"]
    return out, targets


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def reload_with_env(monkeypatch):
    """reload(module, name, value): the module imported again with environment variable `name`
    set to value (None: unset), for switches read at import; afterwards the environment is
    restored and each module reloaded as it was."""
    import importlib
    reloaded = []

    def reload(module, name: str, value: str | None):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
        reloaded.append(module)
        return importlib.reload(module)

    yield reload
    monkeypatch.undo()
    for module in reloaded:
        importlib.reload(module)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A built default corpus (cache folder), shared by the session's train.py runs."""
    from longctx.data import TextDataModule

    cache = tmp_path_factory.mktemp("cache")
    TextDataModule(cache_dir=str(cache)).prepare_data()
    return cache


@pytest.fixture(scope="session")
def forked(tmp_path_factory):
    """run(args, cwd, env, timeout, config) -> (exit code, output) of `python train.py fit --config
    CONFIG *args` in cwd (CONFIG: tests/configs/tiny.yaml unless given), through
    tests/forkserver.py: train.py's imports are paid once for the session's runs (~8 s each on 2
    cores). The code is Popen's: negative for a signal. On timeout the run's
    session is killed (no orphans) and TimeoutExpired raised."""
    logs = tmp_path_factory.mktemp("forked")
    count = 0
    server_env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "tests"), ROOT]))
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "forkserver.py")], env=server_env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    pending = b""

    def answer(deadline):
        nonlocal pending
        while b"\n" not in pending:
            if not select.select([server.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
                return None
            chunk = os.read(server.stdout.fileno(), 4096)
            assert chunk, "the fork server died"
            pending += chunk
        line, pending = pending.split(b"\n", 1)
        return json.loads(line)

    def run(args, cwd, env=None, timeout=180, config=TINY):
        nonlocal count
        deadline, count = time.monotonic() + timeout, count + 1
        out = str(logs / f"run{count}.out")
        request = {"args": ["fit", "--config", config, *args], "cwd": str(cwd), "env": env or {}, "out": out}
        server.stdin.write((json.dumps(request) + "\n").encode())
        pid = answer(deadline)["pid"]
        done = answer(deadline)
        if done is None:
            os.killpg(pid, 9)
            answer(time.monotonic() + 60)
            raise subprocess.TimeoutExpired(request["args"], timeout)
        return done["rc"], open(out).read()

    yield run
    server.stdin.close()
    server.wait(timeout=60)


def leftover(marker: str) -> list[str]:
    """Processes whose command line contains `marker` (other than ourselves)."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in cmd and "pytest" not in cmd:
                found.append(cmd)
    return found
