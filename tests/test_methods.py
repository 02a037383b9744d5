"""--method qlora|lora|dora|ia3|adapter|full and --param_budget (qlora_cls/methods.py).

Every method on a decoder (tiny Llama) and an encoder (tiny RoBERTa): ft.py trains, saves, and eval.py reloads
to the identical predictions; only the intended parameters change in training (hand-written per method);
the bottleneck adapter is the identity at init (against the base model's own forward) and computes
h + up(gelu(down(h))) (against a hand computation); --param_budget picks the largest size that fits (the
next size up, counted on a real model, does not; the RoBERTa-base study's r=22 / 999,172 by hand); bad
combinations are one line and exit 2 before any model loads.
"""
import filecmp
import json

import pytest
import torch

import eval as eval_cli
import ft
from conftest import build_tiny_architecture

METHODS = ("qlora", "lora", "dora", "ia3", "adapter", "full")
ARCHS = ("llama", "roberta")
# What each method trains, by parameter name (the head: PEFT's modules_to_save copy, or the head module itself).
HEAD = {"llama": ("score.",), "gpt2": ("score.",), "roberta": ("classifier.",)}
TRAINED = {"qlora": ("lora_A", "lora_B"), "lora": ("lora_A", "lora_B"),
           "dora": ("lora_A", "lora_B", "lora_magnitude_vector"), "ia3": ("ia3_l",), "adapter": (".adapter.",)}
# Where adapters go, written out per family: each block's attention output and FFN output projection.
ADAPTED = {"llama": ("self_attn.o_proj", "mlp.down_proj"), "roberta": ("attention.output.dense", "output.dense")}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    return {arch: str(build_tiny_architecture(arch, root / arch)) for arch in ARCHS + ("gpt2",)}


def _cfg(path, method, **kw):
    from qlora_cls.config import TrainConfig
    cfg = TrainConfig(model_dir=path, method=method, lora_dropout=0.0, **kw)
    cfg.resolve_auto("cpu")
    return cfg


def _build(path, cfg, num_labels=2):
    from qlora_cls.methods import add_trainable
    from qlora_cls.modeling import load_base_model, load_tokenizer
    torch.manual_seed(0)
    return add_trainable(load_base_model(cfg, path, num_labels, load_tokenizer(path).pad_token_id, {"": "cpu"}), cfg)


def _batch(path):
    from qlora_cls.modeling import load_tokenizer
    tok = load_tokenizer(path)
    enc = tok(["a short one", "a much longer sentence about cats and dogs", "the third"], padding=True,
              return_tensors="pt")
    return dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=torch.tensor([0, 1, 1]))


def _state(model):
    """Every parameter by its name in the base model (PEFT's and the adapters' wrappers stripped)."""
    out = {}
    for n, p in model.named_parameters():
        out[n] = p.detach().clone()
    return out


SLOW = pytest.mark.slow
CASES = ([("llama", m, "auto") for m in METHODS] + [pytest.param("roberta", m, "auto", marks=SLOW) for m in METHODS]
         # GPT-2's Conv1D layers in 16 bit: PEFT needs fan_in_fan_out, the adapter the Conv1D's output width
         + [pytest.param("gpt2", m, False, marks=SLOW) for m in ("lora", "dora", "ia3", "adapter")])


@pytest.mark.parametrize("arch,method,four_bit", CASES)
def test_only_the_intended_parameters_change(models, arch, method, four_bit):
    """Three 8-bit AdamW steps (ft.py's optimizer), then every parameter compared with its value before: those
    the method trains (hand-written name patterns; all of them for full) changed, every other one did not (the
    4-bit packed weights included), and an evaluation forward in between keeps gradients flowing (CPU repack)."""
    path = models[arch]
    cfg = _cfg(path, method, lr=1e-2, load_in_4bit=four_bit)
    model = _build(path, cfg)
    before = _state(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = set(before) if method == "full" else {
        n for n in before if any(t in n for t in TRAINED[method])
        or ("modules_to_save" in n if method in TRAINED and method != "adapter" else False)
        or (method == "adapter" and any(n.startswith(h) for h in HEAD[arch]))}
    assert trainable == expected and expected
    opt = ft.make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    batch = _batch(path)
    for step in range(3):
        model.train()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        if step == 0:
            model.eval()
            with torch.inference_mode():
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    after = _state(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == expected, (sorted(expected - changed)[:5], sorted(changed - expected)[:5])
    if cfg.load_in_4bit:
        import bitsandbytes as bnb
        assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_is_the_identity_at_init_and_computes_the_bottleneck(models, arch):
    from qlora_cls.methods import AdaptedModule, BottleneckAdapter, add_adapters
    from qlora_cls.modeling import load_base_model, load_tokenizer
    path = models[arch]
    cfg = _cfg(path, "adapter", load_in_4bit=False)
    torch.manual_seed(0)
    base = load_base_model(cfg, path, 2, load_tokenizer(path).pad_token_id, {"": "cpu"}).eval()
    batch = _batch(path)
    with torch.no_grad():
        reference = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        wrapped = add_adapters(base, 8, True)
        # two per block, at the attention and FFN outputs (names by hand), and nothing else
        assert len(wrapped) == 2 * base.config.num_hidden_layers
        assert all(any(n.endswith(s) for s in ADAPTED[arch]) and "intermediate" not in n for n in wrapped)
        assert sum(isinstance(m, AdaptedModule) for m in base.modules()) == len(wrapped)
        same = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(same, reference, rtol=0, atol=0)  # zero up-projection: the base model exactly
        for m in base.modules():
            if isinstance(m, BottleneckAdapter):
                m.up.weight.normal_(0, 0.5)
        moved = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert not torch.allclose(moved, reference)  # the adapters are on the path of the forward
    # the module against a hand computation: LayerNorm, down, GELU (erf form), up, residual
    torch.manual_seed(1)
    a = BottleneckAdapter(4, 2, layernorm=True)
    with torch.no_grad():
        a.up.weight.copy_(torch.tensor([[1.0, -2.0], [0.5, 0.0], [0.0, 3.0], [1.0, 1.0]]))
        a.up.bias.copy_(torch.tensor([0.1, 0.0, -0.1, 0.0]))
        h = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
        x = (h - 2.5) / torch.sqrt(torch.tensor(1.25 + 1e-5))
        d = x @ a.down.weight.T + a.down.bias
        g = 0.5 * d * (1 + torch.erf(d / 2 ** 0.5))
        torch.testing.assert_close(a(h), h + g @ a.up.weight.T + a.up.bias)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_train_save_reload_equal(models, glue_fixture, tmp_path, arch, method):
    """ft.py a few steps, eval.py reloads adapter/ to the identical predictions and metrics, which differ from
    the base model's (the saved weights are what makes them)."""
    run = tmp_path / "run"
    summary = ft.main(["--model_dir", models[arch], "--dataset", glue_fixture, "--results_path", str(run),
                       "--max_steps", "3", "--max_eval_samples", "12", "--eval_batch_size", "5", "--method", method,
                       "--lr", "5e-3", "--adapter_bottleneck", "8"])
    records = json.loads((run / "config.json").read_text())
    assert records["config"]["method"] == method
    assert records["config"]["load_in_4bit"] is (method not in ("lora", "full"))
    assert records["resolved"]["parameters"] == summary["parameters"]
    files = {p.name for p in (run / "adapter").iterdir()}
    assert files == ({"README.md", "weights.safetensors", "qlora_cls_method.json"} if method in ("adapter", "full")
                     else {"README.md", "adapter_config.json", "adapter_model.safetensors"})
    from safetensors.torch import load_file
    saved = load_file(run / "adapter" / ("weights.safetensors" if method in ("adapter", "full")
                                         else "adapter_model.safetensors"))
    head = [v for k, v in saved.items() if any(h in k for h in HEAD[arch]) and k.endswith("weight")]
    assert head and all(v.dtype == torch.float32 for v in head)  # the head is saved, in full precision
    if method == "full":
        assert sum(v.numel() for v in saved.values()) == summary["parameters"]["trainable"]
    card = (run / "adapter" / "README.md").read_text()
    assert f"- **Method:** {summary['run']['method']}" in card and method in card
    if method in ("adapter", "full"):  # not PEFT formats: the card's qlora-cls snippet loads the trained weights
        scope = {}
        exec(card.split("```python\n")[1].split("```")[0], scope)
        loaded = dict(scope["model"].named_parameters())
        assert saved and all(torch.equal(loaded[k].float(), v.float()) for k, v in saved.items())
    result = eval_cli.main(["--results_path", str(run)])
    assert result["metrics"] == {k: summary["final"][k] for k in result["metrics"]} and result["metrics"]
    assert filecmp.cmp(run / "predictions_validation.csv", run / "evals/validation-perfect/predictions.csv",
                       shallow=False)
    eval_cli.main(["--results_path", str(run), "--base_only"])
    assert not filecmp.cmp(run / "predictions_validation.csv", run / "evals/validation-perfect-base/predictions.csv",
                           shallow=False)


# -- --param_budget --------------------------------------------------------------------------------------
def _real_count(path, cfg, num_labels=2):
    from qlora_cls.modeling import parameter_counts
    return parameter_counts(_build(path, cfg, num_labels))["trainable"]


@pytest.mark.parametrize("arch,method", [("llama", "qlora"), ("roberta", "dora"), ("llama", "adapter")])
def test_param_budget_picks_the_largest_size_that_fits(models, arch, method):
    import dataclasses

    from qlora_cls.methods import resolve_param_budget
    path = models[arch]
    budget = 9000
    cfg = _cfg(path, method, param_budget=budget)
    chosen = resolve_param_budget(cfg, path, 2)
    field = "adapter_bottleneck" if method == "adapter" else "r"
    size = getattr(cfg, field)
    assert chosen["field"] == field and chosen["value"] == size and size > 1
    # the second route: the real model (weights loaded, 4 bit where the method is) at that size and one above
    assert _real_count(path, cfg) == chosen["trainable"] <= budget
    assert _real_count(path, dataclasses.replace(cfg, **{field: size + 1})) == chosen["next_trainable"] > budget


def test_param_budget_refuses_when_nothing_fits(models, glue_fixture, tmp_path, capsys):
    for method, words in (("lora", "even --r 1 trains"), ("adapter", "even --adapter_bottleneck 1 trains"),
                          ("ia3", "has no size to choose")):
        with pytest.raises(SystemExit) as exc:
            ft.main(["--model_dir", models["llama"], "--dataset", glue_fixture, "--results_path",
                     str(tmp_path / method), "--method", method, "--param_budget", "100"])
        err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("ft.py: error:")]
        assert exc.value.code == 2 and len(err) == 1 and words in err[0] and "--param_budget 100" in err[0]
        assert not (tmp_path / method).exists()


def test_param_budget_of_the_roberta_base_study(tmp_path):
    """AG News (4 classes), RoBERTa-base, LoRA on value only under 1,000,000: r=22, 999,172 parameters.
    By hand: 12 layers x r x (768 + 768) per value projection + head (dense 768x768+768, out_proj 768x4+4)."""
    from transformers import RobertaConfig

    from qlora_cls.methods import resolve_param_budget
    RobertaConfig().save_pretrained(tmp_path)  # roberta-base's shapes (the transformers defaults)
    head = 768 * 768 + 768 + 768 * 4 + 4
    cfg = _cfg(str(tmp_path), "lora", target_modules=["value"], lora_alpha=44, param_budget=1_000_000)
    chosen = resolve_param_budget(cfg, str(tmp_path), 4)
    assert (cfg.r, chosen["trainable"]) == (22, 12 * 22 * 1536 + head) == (22, 999_172)
    assert chosen["next_trainable"] == 12 * 23 * 1536 + head > 1_000_000


# -- flags and their combinations --------------------------------------------------------------------------
@pytest.mark.parametrize("argv,words", [
    (["--method", "full", "--load_in_4bit", "true"], ["--method full", "4-bit weights", "--load_in_4bit"]),
    (["--method", "qlora", "--load_in_4bit", "false"], ["--method qlora", "needs --load_in_4bit true", "--method lora"]),
    (["--method", "lora", "--load_in_4bit", "true"], ["--method lora", "16-bit", "--method qlora"]),
    (["--method", "prefix"], ["--method", "prefix", "qlora"]),
    (["--param_budget", "0"], ["--param_budget must be > 0"]),
    (["--adapter_bottleneck", "0"], ["--adapter_bottleneck must be > 0"]),
    (["--target_modules", "auto", "q_proj"], ["auto stands alone"]),
])
def test_bad_combinations_are_one_line_before_any_model_loads(tmp_path, capsys, argv, words):
    with pytest.raises(SystemExit) as exc:  # a model folder that does not exist: nothing is loaded before the error
        ft.main(["--model_dir", str(tmp_path / "no-model"), "--results_path", str(tmp_path / "run"), *argv])
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("ft.py: error:")]
    assert exc.value.code == 2 and len(err) == 1 and all(w in err[0] for w in words), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv,method,four_bit,targets", [
    ([], "qlora", True, ["attention-qv"]),                         # today's default
    (["--load_in_4bit", "false"], "lora", False, ["attention-qv"]),  # today's 16-bit LoRA
    (["--method", "full"], "full", False, ["attention-qv"]),       # no second flag needed
    (["--method", "dora", "--load_in_4bit", "false"], "dora", False, ["attention-qv"]),
    (["--method", "ia3"], "ia3", True, ["kv-ffn"]),
    (["--method", "adapter"], "adapter", True, ["attention-qv"]),
])
def test_method_and_load_in_4bit_resolve(argv, method, four_bit, targets):
    from qlora_cls.cli import parse_dataclass
    from qlora_cls.config import TrainConfig
    cfg = parse_dataclass(TrainConfig, argv, "ft.py", "")
    assert (cfg.method, cfg.load_in_4bit, cfg.target_modules) == (method, four_bit, targets)
    from dataclasses import asdict
    again = TrainConfig(**asdict(cfg))  # what eval.py and --resume do with config.json: the same settings
    assert asdict(again) == asdict(cfg)


def test_targets_per_method_resolved_by_role(models):
    from qlora_cls.methods import peft_config, plan
    from qlora_cls.modeling import meta_model
    expected = {"llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
                "roberta": (["key", "value", "0.output.dense", "1.output.dense"], ["0.output.dense", "1.output.dense"])}
    for arch, (targets, feedforward) in expected.items():
        arch_model = meta_model(models[arch], 2)
        cfg = _cfg(models[arch], "ia3")
        p = plan(cfg, arch_model)
        assert list(p.target_modules) == targets
        assert sorted(peft_config(cfg, arch_model, p).feedforward_modules) == sorted(feedforward)
    assert plan(_cfg(models["llama"], "adapter"), meta_model(models["llama"], 2)).target_modules == ("o_proj", "down_proj")
    assert plan(_cfg(models["llama"], "full"), meta_model(models["llama"], 2)).target_modules == ()


def test_a_run_saved_before_method_existed_resumes_as_it_ran(tmp_path):
    """No method in its config.json: load_in_4bit false was LoRA on a 16-bit base, true was QLoRA."""
    from dataclasses import asdict

    from qlora_cls.checkpoint import check_resumable
    from qlora_cls.config import TrainConfig
    from qlora_cls.errors import UsageError
    for four_bit, method in ((False, "lora"), (True, "qlora")):
        old = asdict(TrainConfig(load_in_4bit=four_bit))
        for k in ("method", "adapter_bottleneck", "adapter_layernorm", "param_budget"):
            del old[k]
        (tmp_path / "config.json").write_text(json.dumps({"config": old}))
        check_resumable(tmp_path, asdict(TrainConfig(load_in_4bit=four_bit)))
        assert TrainConfig(**old).method == method
        with pytest.raises(UsageError, match="method"):
            check_resumable(tmp_path, asdict(TrainConfig(method="dora", load_in_4bit=four_bit)))


def test_a_sweep_started_before_method_existed_resumes(tmp_path):
    """Its sweep.json holds configs without the method fields: read as they ran, the same sweep, not another."""
    from qlora_cls import sweeps
    g = sweeps.make_grid(["--seed", "1", "2", "--load_in_4bit", "false", "--model_dir", str(tmp_path / "m")], None)
    pts = sweeps.points(g)
    sweeps.Manifest.open(tmp_path / "s", g, pts, sweeps.validate(g, pts, tmp_path / "s"), [])
    manifest = json.loads((tmp_path / "s" / "sweep.json").read_text())
    for point in manifest["points"].values():
        for k in ("method", "adapter_bottleneck", "adapter_layernorm", "param_budget"):
            del point["config"][k]
    (tmp_path / "s" / "sweep.json").write_text(json.dumps(manifest))
    sweeps.Manifest.open(tmp_path / "s", g, pts, sweeps.validate(g, pts, tmp_path / "s"), [])  # no refusal
    g2 = sweeps.make_grid(["--seed", "1", "2", "--method", "dora", "--load_in_4bit", "false", "--model_dir",
                           str(tmp_path / "m")], None)
    from qlora_cls.errors import UsageError
    with pytest.raises(UsageError, match="method"):
        sweeps.Manifest.open(tmp_path / "s", g2, pts, sweeps.validate(g2, pts, tmp_path / "s"), [])


def test_methods_are_sweepable(tmp_path, capsys):
    import sweep
    code = sweep.main(["--sweep_dir", str(tmp_path / "s"), "--dry_run", "--method", *METHODS])
    out = capsys.readouterr().out
    assert code in (0, None) and all(f"method={m}" in out for m in METHODS)
    with pytest.raises(SystemExit) as exc:  # every point is checked before anything runs
        sweep.main(["--sweep_dir", str(tmp_path / "t"), "--dry_run", "--method", "qlora", "full", "--load_in_4bit", "true"])
    assert exc.value.code == 2 and "--method full" in capsys.readouterr().err


# -- the memory dry-run covers every method ---------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_dry_run_counts_equal_the_real_model(models, method):
    from qlora_cls import memory
    from qlora_cls.modeling import parameter_counts
    path = models["llama"]
    cfg = _cfg(path, method)
    est = memory.estimate(cfg, path, 2, 64, 64)
    model = _build(path, cfg)
    counts = parameter_counts(model)
    assert (est["trainable_params"], est["total_params"]) == (counts["trainable"], counts["total"])
    assert est["method_activation_bytes_per_token_layer"] > 0 and est["gradient_bytes"] > 0
    if method == "full":  # 16-bit base: the weight figure is the loaded parameters' and buffers' bytes
        real = sum(p.numel() * p.element_size() for p in model.parameters())
        real += sum(b.numel() * b.element_size() for b in model.buffers())
        assert est["weight_bytes"] == real and est["lora_bytes"] == 0
        assert est["gradient_bytes"] == sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.slow
def test_param_budget_on_the_embedded_model(mrpc, tmp_path):
    """--param_budget 1000000 on SmolLM2-135M: the count in config.json is the loaded model's own, <= 1,000,000."""
    run = tmp_path / "run"
    summary = ft.main(["--dataset", mrpc, "--results_path", str(run), "--param_budget", "1000000", "--max_steps", "2",
                       "--max_train_samples", "16", "--max_eval_samples", "8", "--batch_size", "4",
                       "--latency_calls", "0"])
    records = json.loads((run / "config.json").read_text())
    chosen = records["resolved"]["param_budget"]
    assert chosen["trainable"] == records["resolved"]["parameters"]["trainable"] == summary["parameters"]["trainable"]
    assert chosen["trainable"] <= 1_000_000 < chosen["next_trainable"]
    assert records["config"]["r"] == chosen["value"] and records["config"]["param_budget"] == 1_000_000
    assert f"--param_budget 1,000,000: r={chosen['value']} chosen" in records["run"]["method"]
