"""ft.py as `accelerate launch` runs it, plus: every process writes its final trainable weights to
$RANK_DUMP_DIR/rank<N>.safetensors (the run folder holds rank 0's only). Test-side code: it wraps
ft.save_trained, so production code carries no hook for it."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import ft  # noqa: E402
from qlora_cls import checkpoint  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

_save = ft.save_trained


def _save_and_dump(accelerator, model, path, *args):
    _save(accelerator, model, path, *args)
    if path.name == "adapter":
        save_file(checkpoint.trainable_state(accelerator.unwrap_model(model)),
                  Path(os.environ["RANK_DUMP_DIR"]) / f"rank{accelerator.process_index}.safetensors")


ft.save_trained = _save_and_dump
if __name__ == "__main__":
    ft.main()
