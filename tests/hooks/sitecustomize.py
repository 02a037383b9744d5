"""Test-only start-up hook (on PYTHONPATH only in the tiny_sweep fixture's first pass, never in production).

Makes the interruption of a sweep deterministic: when ft.py, running in the folder named by
QLORA_TEST_STOP_POINT, has logged step QLORA_TEST_STOP_STEP, it creates the file QLORA_TEST_STOP_MARKER
(the test then sends SIGTERM to sweep.py, as a cluster would) and waits until the SIGTERM that sweep.py
forwards has reached ft.py's own handler. The run then stops at that step, whatever the machine's speed.
"""
import os

if os.environ.get("QLORA_TEST_STOP_POINT"):
    import signal
    import sys
    import time
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: ft.py's own imports
    from qlora_cls import files

    _append = files.append_jsonl

    def append_then_wait_for_sigterm(path, obj):
        _append(path, obj)
        if Path(path).parent.name != os.environ["QLORA_TEST_STOP_POINT"]:
            return
        if not isinstance(obj, dict) or obj.get("step") != int(os.environ["QLORA_TEST_STOP_STEP"]):
            return
        received, ft_handler = [], signal.getsignal(signal.SIGTERM)

        def note_then_forward(signum, frame):
            received.append(signum)
            ft_handler(signum, frame)

        signal.signal(signal.SIGTERM, note_then_forward)
        Path(os.environ["QLORA_TEST_STOP_MARKER"]).touch()
        deadline = time.monotonic() + 300
        while not received and time.monotonic() < deadline:
            time.sleep(0.01)
        signal.signal(signal.SIGTERM, ft_handler)

    files.append_jsonl = append_then_wait_for_sigterm
