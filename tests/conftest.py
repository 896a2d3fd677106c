import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Without a GPU, the Triton kernels (longctx/attention/combine.py) run in Triton's interpreter.
# It must be chosen before Triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def load_script(name: str):
    """scripts/NAME.py as a module (scripts/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, f"{ROOT}/scripts/{name}.py")
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
