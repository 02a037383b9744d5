"""checkpoint.py's own save vs accelerate's save_state, side by side on one trained model (CPU).

    OMP_NUM_THREADS=1 python bench/checkpoint_state.py [--model_dir DIR] [--steps 2]

Arms: ``ours`` (checkpoint.save: trainable weights, optimizer, scheduler, RNG, progress), ``save_state``
(accelerate as is: the whole state dict, frozen 4-bit weights included) and ``save_state_hook``
(register_save_state_pre_hook keeps only the trainable weights, the scheduler registered with
register_for_checkpointing). Prints size on disk and save time (median of 3), and whether a
load_state of the hooked arm restores the saved weights and optimizer state exactly.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model_dir", default=None)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args(argv)
    import torch
    from accelerate import Accelerator
    from transformers import get_linear_schedule_with_warmup

    import ft
    from qlora_cls import checkpoint
    from qlora_cls.config import TrainConfig
    from qlora_cls.modeling import add_lora, load_base_model, load_tokenizer, resolve_model_dir
    path = resolve_model_dir(args.model_dir)
    cfg = TrainConfig(model_dir=path, bnb_4bit_compute_dtype="float32", gradient_checkpointing=False)
    acc = Accelerator(cpu=True)
    model = add_lora(load_base_model(cfg, path, 2, load_tokenizer(path).pad_token_id, {"": "cpu"}), cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = ft.make_optimizer(cfg, trainable)
    scheduler = get_linear_schedule_with_warmup(optimizer, 1, 100)
    model, optimizer = acc.prepare(model, optimizer)
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(5, 1000, (4, 64)), "attention_mask": torch.ones(4, 64, dtype=torch.long),
             "labels": torch.tensor([0, 1, 0, 1])}

    def step():
        model.train()
        acc.backward(model(**batch).loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.steps):
        step()
    names = {n for n, p in acc.unwrap_model(model).named_parameters() if p.requires_grad}

    def keep_trainable(models, weights, output_dir):
        for i, w in enumerate(weights):
            weights[i] = {k: v for k, v in w.items() if k in names}

    def load_trainable(models, input_dir):
        from safetensors.torch import load_file
        state = load_file(Path(input_dir) / "model.safetensors")
        acc.unwrap_model(models.pop()).load_state_dict(state, strict=False)

    acc.register_for_checkpointing(scheduler)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arm in ("ours", "save_state", "save_state_hook"):
            seconds, out = [], None
            handle = acc.register_save_state_pre_hook(keep_trainable) if arm == "save_state_hook" else None
            for i in range(3):
                run = Path(tmp) / f"{arm}-{i}"
                run.mkdir()
                start = time.perf_counter()
                if arm == "ours":
                    out = checkpoint.save(acc, run, model, optimizer, scheduler,
                                          {"global_step": args.steps, "epoch": 0}, keep=1)
                else:
                    out = run / "state"
                    acc.save_state(str(out))
                seconds.append(time.perf_counter() - start)
            if handle:
                handle.remove()
            results[arm] = (size(out), statistics.median(seconds))
            print(f"{arm:>16}: {size(out) / 2**20:8.2f} MiB on disk, save {statistics.median(seconds):.3f} s "
                  f"({', '.join(sorted(p.name for p in out.iterdir()))})", flush=True)
        # resume equality of the hooked arm: train on, then load the checkpoint back
        saved = {n: p.detach().clone() for n, p in acc.unwrap_model(model).named_parameters() if p.requires_grad}
        opt_saved = {k: v.clone() for k, v in optimizer.state_dict()["state"][0].items() if torch.is_tensor(v)}
        step()
        acc.register_load_state_pre_hook(load_trainable)
        acc.load_state(str(Path(tmp) / "save_state_hook-2" / "state"))
        now = dict(acc.unwrap_model(model).named_parameters())
        same_w = all(torch.equal(now[n], v) for n, v in saved.items())
        opt_now = optimizer.state_dict()["state"][0]
        same_o = all(torch.equal(opt_now[k], v) for k, v in opt_saved.items())
        print(f"save_state_hook resume: trainable weights equal {same_w}, optimizer state equal {same_o}, "
              f"scheduler last_epoch {scheduler.last_epoch} (saved at {args.steps})")
    return results


if __name__ == "__main__":
    main()
