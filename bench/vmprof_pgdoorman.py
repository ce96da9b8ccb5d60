"""
pgdoorman on PyPy with vmprof switched on and off by SIGUSR1 (py-spy cannot read PyPy).

    PGDOORMAN_VMPROF=BASE pypy bench/vmprof_pgdoorman.py CONFIG   # as python -m pgdoorman
    pypy bench/vmprof_pgdoorman.py --top FILE.vmprof [N]         # functions by self/total

Each SIGUSR1 starts a profile in BASE.N.vmprof (N = 1, 2, ...) or stops the running one, so
bench/run.py --profile --pypy samples only the pgbench run it profiles.  pgdoorman itself uses
SIGHUP, SIGINT, SIGTERM and SIGUSR2; SIGUSR1 is free.  Needs `pip install vmprof` in the PyPy
venv (bench/profile.sh --pypy does it).
"""

import os
import runpy
import signal
import sys


def serve():
    import vmprof
    base = os.environ["PGDOORMAN_VMPROF"]
    state = {"file": None, "n": 0}

    def toggle(signum, frame):
        if state["file"] is None:
            state["n"] += 1
            state["file"] = open("%s.%d.vmprof" % (base, state["n"]), "w+b")
            vmprof.enable(state["file"].fileno(), period=0.001)
        else:
            vmprof.disable()
            state["file"].close()
            state["file"] = None

    signal.signal(signal.SIGUSR1, toggle)
    sys.argv = ["pgdoorman"] + sys.argv[1:]
    runpy.run_module("pgdoorman", run_name="__main__", alter_sys=True)


def top(path, n=30):
    import vmprof
    stats = vmprof.read_profile(path)
    self_, total, samples = {}, {}, 0

    def name(addr):
        entry = stats.adr_dict.get(addr) if stats.adr_dict else None
        if not entry:
            return "<native: RPython builtins, system calls, unresolved>"
        # "py:function:line:file"
        lang, symbol, _line, filename = (entry.split(":", 3) + ["", "", ""])[:4]
        return "%s (%s)" % (symbol, filename) if lang == "py" else "%s [%s]" % (symbol, lang)

    for profile in stats.profiles:
        # ints are code addresses (negative: line numbers); JittedCode/AssemblerCode entries
        # only mark that the function before them ran as machine code
        stack = [name(a) for a in profile[0] if isinstance(a, int) and a > 0]
        if not stack:
            continue
        samples += 1
        self_[stack[-1]] = self_.get(stack[-1], 0) + 1
        for fr in set(stack):
            total[fr] = total.get(fr, 0) + 1
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + "/"
    out = ["%d samples (vmprof, CPU time, 1 ms period; JIT-compiled code counts as its Python "
           "function)" % samples, "", "  self%  total%  function"]
    for fr, c in sorted(self_.items(), key=lambda kv: -kv[1])[:n]:
        out.append("%6.1f  %6.1f  %s" % (100.0 * c / samples, 100.0 * total[fr] / samples,
                                         fr.replace(root, "")))
    out += ["", "by total (inclusive):", "  total%  self%  function"]
    for fr, c in sorted(total.items(), key=lambda kv: -kv[1])[:n]:
        out.append("%6.1f  %6.1f  %s" % (100.0 * c / samples, 100.0 * self_.get(fr, 0) / samples,
                                         fr.replace(root, "")))
    print("\n".join(out))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--top"]:
        top(sys.argv[2], *(int(a) for a in sys.argv[3:4]))
    else:
        serve()
