"""The package's shape: no import cycles (function-level imports included), and each field role declared once
(config.py's field metadata) is what every consumer reads."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "qlora_cls"


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its file (top level or inside functions)."""
    modules = {p.stem for p in PKG.glob("*.py")}
    graph = {}
    for path in PKG.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level == 1 or (node.module or "").startswith("qlora_cls")):
                parts = (node.module or "").removeprefix("qlora_cls").strip(".").split(".")
                deps |= {parts[0]} if parts[0] else {a.name for a in node.names}  # "from . import x" names modules
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("qlora_cls.")}
        graph[path.stem] = (deps & modules) - {path.stem}
    return graph


def find_cycle(graph: dict[str, set[str]]):
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node, path):
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep, path + [dep])):
                return cycle
        state[node] = 2

    return next((c for m in sorted(graph) if m not in state and (c := visit(m, [m]))), None)


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_sees_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_field_roles_are_what_consumers_read():
    from qlora_cls import checkpoint, report, runs, sweeps
    from qlora_cls.config import role_fields, with_fields_added_later
    bookkeeping = {"results_path", "resume", "log_every", "checkpoint_every", "keep_checkpoints", "eval_batch_size",
                   "latency_calls", "fast_eval", "skip_nonfinite", "dry_run"}
    base = {"model_dir", "trust_remote_code", "method", "load_in_4bit", "bnb_4bit_use_double_quant",
            "bnb_4bit_quant_type", "bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"}
    assert set(checkpoint.RESUME_MAY_CHANGE) == set(report.BOOKKEEPING) == bookkeeping
    assert set(runs.SHARED_BASE_FIELDS) == base and set(sweeps.RESERVED) == {"results_path", "resume"}
    assert set(sweeps.BASE_FIELDS) == base | set(role_fields("eval_data")) and "tokenizer_dir" in sweeps.BASE_FIELDS
    assert report.ADAPTER_ONLY == ("adapter_bottleneck", "adapter_layernorm")
    assert with_fields_added_later({"load_in_4bit": False, "eval_every": 5}) == {
        "load_in_4bit": False, "eval_every": 5, "method": "lora", "fast_cpu_dropout": False, "adapter_bottleneck": 64,
        "adapter_layernorm": False, "param_budget": None, "share_prefix": False,
        # the generative objectives' fields: runs saved before them were classification runs
        "objective": "classification", "chat_template": None, "instruction_column": "instruction",
        "input_column": "input", "output_column": "output", "train_on_prompt": False, "eval_holdout": 0.1,
        "generate_examples": 100, "max_new_tokens": 128, "do_sample": False, "temperature": 1.0, "top_p": 1.0,
        "stride": None,
        # --classifier label_words: runs saved before it had a head
        "classifier": "head", "label_words": None, "length_normalize": False}
