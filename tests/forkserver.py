"""Runs train.py many times without paying its imports each time (~8 s of a ~10 s failing run on
CI's 2 cores): this process imports what train.py imports, once, then forks a child per request
that runs train.py as `python train.py ...` would, in its own session, its own folder and its own
environment, with stdout and stderr in one file.

Protocol, one JSON line each way: the client sends {"args", "cwd", "env", "out"}; the server
answers {"pid"} once the child runs, then {"rc"} once it has exited (as Popen reports it: the
exit code, or minus the signal that ended it). The server itself runs nothing but imports, so a
child starts with no state but those modules: no RNG used, no threads, no CUDA. Used by
test_reliability for every train.py run (bad configurations, resume after SIGKILL, DDP faults:
Lightning's launcher starts the other ranks as fresh `python train.py` processes).
"""
import json
import os
import runpy
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")


def child(request) -> int:
    """Run train.py with request's arguments; the exit code `python train.py` would give."""
    os.setsid()
    os.chdir(request["cwd"])
    os.environ.update(request["env"])
    fd = os.open(request["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.argv = [TRAIN, *request["args"]]
    try:
        runpy.run_path(TRAIN, run_name="__main__")
        return 0
    except SystemExit as e:  # as the interpreter treats it: None is 0, a message is 1
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def serve() -> None:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    sys.path.insert(0, ROOT)
    import lightning.pytorch  # noqa: F401  (the imports every run shares)
    import longctx.cli  # noqa: F401
    import helpers  # noqa: F401

    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os._exit(child(request))
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    serve()
