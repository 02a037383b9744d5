"""Several eval.py evaluations in one process (what sweep.py launches after each trained point).

    python qlora_cls/sweep_eval.py jobs.json       # jobs.json: {"jobs": [[eval.py args...], ...], "results": path}

Importing torch, transformers and bitsandbytes costs ~10 s per process on a small CPU machine, more
than evaluating the tiny test model; one process per point (not per prompt) keeps sweeps and their
tests fast. Each job is exactly ``eval.py <args>``; a failing job is recorded and the next one runs.
"""
from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    import eval as eval_cli
    from qlora_cls.files import atomic_write_json

    spec = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    errors: list = []
    for args in spec["jobs"]:
        try:
            eval_cli.main(args)
            errors.append(None)
        except SystemExit as exc:  # eval.py printed its one-line usage error
            errors.append(f"eval.py exited with {exc.code} (see the log)")
        except Exception as exc:  # noqa: BLE001 - one failing evaluation must not stop the others
            traceback.print_exc()
            errors.append(f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
    from accelerate import PartialState
    if PartialState().is_main_process:
        atomic_write_json(spec["results"], errors)
    return 1 if any(errors) else 0


if __name__ == "__main__":
    from qlora_cls.procs import exit_with_parent_if_asked
    exit_with_parent_if_asked()  # launched by sweep.py: end with it (see qlora_cls/procs.py)
    raise SystemExit(main())
