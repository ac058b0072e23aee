"""The cost model's two subprocesses, so neither depends on the caller's TRITON_INTERPRET:

- ``capture`` (TRITON_INTERPRET=1): run workloads' launchers as on a GPU, record each launch's
  spec and replay a few of its programs; also the bytes each torch op of the launcher moves.
  A workload's ``run(steady)`` calls ``steady()`` where the part charged begins (what a call
  costs once its one-off work is done).
- ``compile`` (no interpreter): compile each spec for sm_90 (disk-cached) and read its SASS;
- ``masks`` (TRITON_INTERPRET=1): record a plan's masks() on stand-ins (masks_cost.run).

Input and output travel as pickles through files named on the command line.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile


def _capture(workloads) -> list[dict]:
    from . import capture
    from .baselines import count_bytes

    out = []
    for w in workloads:
        with count_bytes(real=True) as ops, capture.gpu_launches() as launches:
            def steady():  # what the workload does once (the first call) is not charged
                launches.clear()
                ops.reset()

            w.run(steady)
        rows = []
        for launch in launches:
            rep = capture.replay(launch)
            file = launch.kernel.fn.__code__.co_filename
            rows.append(dict(module=launch.kernel.fn.__module__, kernel=launch.name,
                             spec=capture.spec(launch), grid=launch.grid, programs=launch.programs,
                             candidate=launch.candidate, replay=rep, file=file,
                             loops=capture.source_loops(file)))
        out.append(dict(workload=w, launches=rows, torch_bytes=ops.bytes, torch_ops=ops.count))
    return out


def _compile(specs) -> list:
    from .sass import compile_sass

    out = []
    for module, kernel, spec in specs:
        try:
            out.append(compile_sass(module, kernel, spec))
        except Exception as exc:  # the one line the caller shows must say which kernel
            raise RuntimeError(f"{module}.{kernel} does not compile for sm_90: {exc!r}"[:300]) from exc
    return out


def call(verb: str, payload):
    """Run ``verb`` on ``payload`` in a fresh interpreter with the right TRITON_INTERPRET."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if verb in ("capture", "masks"):
        env["TRITON_INTERPRET"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in.pkl"), os.path.join(tmp, "out.pkl")
        with open(src, "wb") as f:
            pickle.dump(payload, f)
        done = subprocess.run([sys.executable, "-m", "dimap_fast.cost_model.worker", verb, src, dst],
                              env=env, capture_output=True, text=True)
        if done.returncode:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"cost model {verb} worker failed: {tail}")
        with open(dst, "rb") as f:
            return pickle.load(f)


def main(argv) -> int:
    verb, src, dst = argv
    with open(src, "rb") as f:
        payload = pickle.load(f)
    if verb == "masks":
        from . import masks_cost

        result = [masks_cost.run(model, width) for model, width in payload]
    else:
        result = _capture(payload) if verb == "capture" else _compile(payload)
    with open(dst, "wb") as f:
        pickle.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
